//! Attention forward (and optionally forward + backward) time: wick's fused op against the same
//! maths in plain candle ops (`reference_attention`), one JSON object a line on stdout.
//! `scripts/bench_attention.py` times PyTorch's scaled_dot_product_attention at the same shapes
//! and `scripts/bench_attention.sh` prints the two side by side.
//!
//! cargo bench --bench attention -- [--seconds S] [--seqs 256,1024,4096] [--head-dims 64]
//!     [--batch 1] [--heads 12] [--dtype f32|f16|bf16] [--device cpu|cuda] [--impls fused,reference]
//!     [--backward] [--max-ref-seq N] [--q-len N]
//!
//! `--q-len N`: queries per sequence (default: the sequence length); `--q-len 1` with causal is a
//! KV-cache decoding step over `seq` cached keys.
//!
//! `--check IN OUT`: instead of timing, runs `fused_attention` on every case of IN (the format of
//! tests/fixtures/attention.safetensors: `cases` and `case<i>.{q,k,v,w,scale[,mask]}`, any float
//! dtype) on `--device`, and writes `case<i>.{out,grad_q,grad_k,grad_v}` (gradients of
//! sum(out * w)) to OUT; scripts/attention_check.py compares them with PyTorch.
//!
//! Threads: RAYON_NUM_THREADS (default: all cores). `extra_bytes` is the peak heap memory the
//! call allocated beyond its output, measured with a counting allocator (CPU only), next to
//! `extra_bytes_model`, the fused op's buffers counted from its tile sizes.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use wick::ops::attention::{fused_attention, fused_attention_extra_bytes, reference_attention};

/// mimalloc with a count of the bytes in use and their peak.
struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { INNER.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { INNER.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { INNER.alloc_zeroed(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { INNER.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = CURRENT.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Args {
    seconds: f64,
    seqs: Vec<usize>,
    head_dims: Vec<usize>,
    batch: usize,
    heads: usize,
    dtype: DType,
    device: String,
    impls: Vec<String>,
    backward: bool,
    max_ref_seq: usize,
    check: Option<(String, String)>,
    q_len: Option<usize>,
}

fn list(s: Option<String>) -> Result<Vec<usize>> {
    Ok(s.unwrap_or_default().split(',').map(|x| x.trim().parse()).collect::<std::result::Result<_, _>>()?)
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        seconds: 2.0,
        seqs: vec![256, 1024, 4096],
        head_dims: vec![64],
        batch: 1,
        heads: 12,
        dtype: DType::F32,
        device: "cpu".into(),
        impls: vec!["fused".into(), "reference".into()],
        backward: false,
        max_ref_seq: 4096,
        check: None,
        q_len: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => a.seconds = it.next().unwrap_or_default().parse()?,
            "--seqs" => a.seqs = list(it.next())?,
            "--head-dims" => a.head_dims = list(it.next())?,
            "--batch" => a.batch = it.next().unwrap_or_default().parse()?,
            "--heads" => a.heads = it.next().unwrap_or_default().parse()?,
            "--dtype" => {
                a.dtype = match it.next().unwrap_or_default().as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => anyhow::bail!("unknown dtype {other:?} (f32, f16, bf16)"),
                }
            }
            "--device" => a.device = it.next().unwrap_or_default(),
            "--impls" => a.impls = it.next().unwrap_or_default().split(',').map(String::from).collect(),
            "--backward" => a.backward = true,
            "--max-ref-seq" => a.max_ref_seq = it.next().unwrap_or_default().parse()?,
            "--q-len" => a.q_len = Some(it.next().unwrap_or_default().parse()?),
            "--check" => a.check = Some((it.next().unwrap_or_default(), it.next().unwrap_or_default())),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

/// Multiply-adds of QKᵀ and PV counted as 2 flops each, over the (query, key) pairs computed.
fn flops(b: usize, h: usize, lq: usize, s: usize, d: usize, causal: bool, backward: bool) -> f64 {
    // (query, key) pairs; causal: query i sees keys 0..=i + s - lq
    let pairs = if causal { (0..lq).map(|i| (i + 1 + s - lq.min(s)).min(s)).sum::<usize>() } else { lq * s } as f64;
    let fwd = 4.0 * (b * h * d) as f64 * pairs;
    // the backward pass: 5 matrix products (with P recomputed) against the forward's 2
    if backward {
        fwd * 3.5
    } else {
        fwd
    }
}

/// `--check IN OUT` (see the module docs).
fn check(device: &candle_core::Device, input: &str, output: &str) -> Result<()> {
    let t = candle_core::safetensors::load(input, device)?;
    let get = |k: &str| t.get(k).cloned().ok_or_else(|| anyhow::anyhow!("{input} has no {k}"));
    let cases = get("cases")?.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut out = std::collections::HashMap::new();
    for (c, flags) in cases.iter().enumerate() {
        let p = |n: &str| format!("case{c}.{n}");
        let (q, k, v) = (Var::from_tensor(&get(&p("q"))?)?, Var::from_tensor(&get(&p("k"))?)?, Var::from_tensor(&get(&p("v"))?)?);
        let w = get(&p("w"))?;
        let mask = if flags[1] != 0 { Some(get(&p("mask"))?) } else { None };
        let scale = get(&p("scale"))?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0] as f64;
        let o = fused_attention(&q, &k, &v, mask.as_ref(), scale, flags[0] != 0)?;
        let grads = (o.to_dtype(DType::F32)? * w.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        out.insert(p("out"), o.to_dtype(DType::F32)?);
        for (n, x) in [("grad_q", &q), ("grad_k", &k), ("grad_v", &v)] {
            let g = grads.get(x).ok_or_else(|| anyhow::anyhow!("no gradient for {n}"))?;
            out.insert(p(n), g.to_dtype(DType::F32)?);
        }
    }
    candle_core::safetensors::save(&out, output)?;
    eprintln!("wrote {} cases to {output}", cases.len());
    Ok(())
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    wick::cpu::join_thread_pool();
    let args = parse_args()?;
    let device = wick::device::device(&args.device)?;
    if let Some((input, output)) = &args.check {
        return check(&device, input, output);
    }
    let threads = candle_core::utils::get_num_threads();
    for &d in &args.head_dims {
        for &s in &args.seqs {
            for causal in [false, true] {
                let shape = (args.batch, args.heads, s, d);
                let lq = args.q_len.unwrap_or(s);
                let q_shape = (args.batch, args.heads, lq, d);
                let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, q_shape, &device)?.to_dtype(args.dtype)?)?;
                let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(args.dtype)?)?;
                let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(args.dtype)?)?;
                let w = Tensor::randn(0f32, 1.0, q_shape, &device)?.to_dtype(args.dtype)?;
                let scale = 1.0 / (d as f64).sqrt();
                for name in &args.impls {
                    if name == "reference" && s > args.max_ref_seq {
                        continue;
                    }
                    let f = match name.as_str() {
                        "fused" => fused_attention,
                        "reference" => reference_attention,
                        other => anyhow::bail!("unknown impl {other:?} (fused, reference)"),
                    };
                    let run = || -> Result<Tensor> {
                        let out = f(&q, &k, &v, None, scale, causal)?;
                        if args.backward {
                            let grads = (&out * &w)?.sum_all()?.backward()?;
                            Ok(grads.get(&q).unwrap().clone())
                        } else {
                            Ok(out)
                        }
                    };
                    // warm-up, and the memory of one call
                    let before = CURRENT.load(Ordering::Relaxed);
                    PEAK.store(before, Ordering::Relaxed);
                    let out = run()?;
                    device.synchronize()?;
                    let out_bytes = out.elem_count() * out.dtype().size_in_bytes();
                    let extra = PEAK.load(Ordering::Relaxed).saturating_sub(before + out_bytes);
                    drop(out);
                    let mut times = Vec::new();
                    let start = Instant::now();
                    while times.len() < 3 || (start.elapsed().as_secs_f64() < args.seconds && times.len() < 1000) {
                        let t = Instant::now();
                        let out = run()?;
                        device.synchronize()?;
                        times.push(t.elapsed().as_secs_f64());
                        drop(out);
                    }
                    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    let median = times[times.len() / 2];
                    let mut row = serde_json::json!({
                        "framework": "wick", "impl": name, "device": wick::device::device_name(&device),
                        "threads": threads, "dtype": format!("{:?}", args.dtype).to_lowercase(),
                        "batch": args.batch, "heads": args.heads, "seq": s, "q_len": lq, "head_dim": d, "causal": causal,
                        "backward": args.backward, "ms": median * 1e3, "min_ms": times[0] * 1e3, "runs": times.len(),
                        "tflops": flops(args.batch, args.heads, lq, s, d, causal, args.backward) / median / 1e12,
                    });
                    if device.is_cpu() {
                        row["extra_bytes"] = extra.into();
                        if name == "fused" && !args.backward {
                            row["extra_bytes_model"] = fused_attention_extra_bytes(args.batch, args.heads, s, s, d, threads).into();
                        }
                    }
                    println!("{row}");
                }
            }
        }
    }
    Ok(())
}

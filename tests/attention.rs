//! The fused attention op against the candle-ops reference (outputs and the gradients of q, k, v)
//! on random shapes, and both against PyTorch's `scaled_dot_product_attention`
//! (tests/fixtures/attention.safetensors, written by tests/fixtures/make_attention_fixture.py).
//! WICK_TEST_DEVICE=cuda runs them on the GPU.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, Fixture};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use wick::ops::attention::{attention, fused_attention, reference_attention};
use wick::ops::OpsPath;

fn randn(rng: &mut StdRng, shape: &[usize], std: f32, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.sample::<f32, _>(StandardNormal) * std).collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// (batch, heads, q_len, kv_len, head_dim, causal, padded lengths per batch entry or None).
type Case = (usize, usize, usize, usize, usize, bool, Option<Vec<usize>>);

fn cases() -> Vec<Case> {
    vec![
        (2, 3, 17, 17, 64, false, None),
        (2, 3, 17, 17, 64, true, None),
        (1, 2, 1, 37, 32, true, None),            // decoding: q_len 1 sees every key
        (1, 2, 1, 37, 64, false, Some(vec![20])), // decoding with padding
        (2, 2, 5, 29, 32, true, Some(vec![29, 11])),
        (2, 4, 33, 70, 128, false, Some(vec![70, 3])),
        (3, 1, 70, 300, 64, true, Some(vec![300, 257, 1])), // several key tiles, causal offset
        (1, 2, 130, 130, 64, true, Some(vec![100])),        // several query blocks
        (2, 2, 9, 4, 32, true, None),                       // q_len > kv_len: first rows see nothing
        (2, 2, 8, 8, 32, false, Some(vec![8, 0])),          // a batch entry fully padded
        (1, 1, 300, 520, 128, true, None),
        (1, 3, 65, 129, 64, false, None),
        (2, 2, 13, 21, 24, true, Some(vec![21, 7])), // head_dim not a multiple of 16 (portable kernel)
    ]
}

fn mask_for(pad: &Option<Vec<usize>>, lk: usize, dev: &Device) -> Result<Option<Tensor>> {
    Ok(match pad {
        None => None,
        Some(lens) => {
            let v: Vec<u8> = lens.iter().flat_map(|&n| (0..lk).map(move |j| (j < n) as u8)).collect();
            Some(Tensor::from_vec(v, (lens.len(), lk), dev)?)
        }
    })
}

#[test]
fn fused_matches_reference_f32_with_gradients() -> Result<()> {
    let dev = wick::device::test_device()?;
    let mut rng = StdRng::seed_from_u64(1);
    for (i, (b, h, lq, lk, d, causal, pad)) in cases().into_iter().enumerate() {
        let what = format!("case {i} (b {b} h {h} q {lq} kv {lk} d {d} causal {causal} pad {pad:?})");
        let scale = 1.0 / (d as f64).sqrt();
        let q = Var::from_tensor(&randn(&mut rng, &[b, h, lq, d], 1.5, &dev)?)?;
        let k = Var::from_tensor(&randn(&mut rng, &[b, h, lk, d], 1.5, &dev)?)?;
        let v = Var::from_tensor(&randn(&mut rng, &[b, h, lk, d], 1.0, &dev)?)?;
        let mask = mask_for(&pad, lk, &dev)?;
        let fused = fused_attention(&q, &k, &v, mask.as_ref(), scale, causal)?;
        let reference = reference_attention(&q, &k, &v, mask.as_ref(), scale, causal)?;
        assert_close(&format!("{what} output"), &fused, &reference, 1e-5)?;
        let w = randn(&mut rng, &[b, h, lq, d], 1.0, &dev)?;
        let gf = (&fused * &w)?.sum_all()?.backward()?;
        let gr = (&reference * &w)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (gf.get(var).expect("fused grad"), gr.get(var).expect("reference grad"));
            assert_close(&format!("{what} grad {name}"), a, r, 1e-4)?;
        }
    }
    Ok(())
}

#[test]
fn fused_matches_reference_half_precision() -> Result<()> {
    let dev = wick::device::test_device()?;
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in [DType::F16, DType::BF16] {
        for (i, (b, h, lq, lk, d, causal, pad)) in cases().into_iter().enumerate() {
            let what = format!("{dtype:?} case {i}");
            let scale = 1.0 / (d as f64).sqrt();
            let q = randn(&mut rng, &[b, h, lq, d], 1.0, &dev)?.to_dtype(dtype)?;
            let k = randn(&mut rng, &[b, h, lk, d], 1.0, &dev)?.to_dtype(dtype)?;
            let v = randn(&mut rng, &[b, h, lk, d], 1.0, &dev)?.to_dtype(dtype)?;
            let mask = mask_for(&pad, lk, &dev)?;
            let fused = fused_attention(&q, &k, &v, mask.as_ref(), scale, causal)?;
            assert_eq!(fused.dtype(), dtype);
            let reference = reference_attention(&q, &k, &v, mask.as_ref(), scale, causal)?;
            assert_eq!(reference.dtype(), dtype);
            assert_close(&what, &fused, &reference, 1e-2)?;
        }
    }
    Ok(())
}

#[test]
fn rows_that_see_nothing_are_zero() -> Result<()> {
    let dev = wick::device::test_device()?;
    let mut rng = StdRng::seed_from_u64(3);
    let (q, k, v) = (randn(&mut rng, &[2, 1, 6, 32], 1.0, &dev)?, randn(&mut rng, &[2, 1, 4, 32], 1.0, &dev)?, randn(&mut rng, &[2, 1, 4, 32], 1.0, &dev)?);
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [0, 0, 0, 0]], &dev)?;
    for f in [fused_attention, reference_attention] {
        let out = f(&q, &k, &v, Some(&mask), 0.2, true)?;
        // batch 1 is all padding; in batch 0 the first two rows (i + 4 - 6 < 0) see no key
        assert_eq!(out.get(1)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert_eq!(out.get(0)?.narrow(1, 0, 2)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert!(out.get(0)?.narrow(1, 2, 4)?.abs()?.min_all()?.to_scalar::<f32>()? > 0.0);
        assert!(out.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()));
    }
    Ok(())
}

#[test]
fn dispatcher_follows_wick_ops() -> Result<()> {
    let dev = wick::device::test_device()?;
    let mut rng = StdRng::seed_from_u64(4);
    let (q, k, v) = (randn(&mut rng, &[1, 2, 5, 32], 1.0, &dev)?, randn(&mut rng, &[1, 2, 7, 32], 1.0, &dev)?, randn(&mut rng, &[1, 2, 7, 32], 1.0, &dev)?);
    let reference = reference_attention(&q, &k, &v, None, 0.3, true)?;
    let path = OpsPath::from_env()?;
    assert_eq!(OpsPath::current(), path);
    let ours = attention(&q, &k, &v, None, 0.3, true)?;
    if path == OpsPath::Reference {
        assert_close("attention under WICK_OPS=reference", &ours, &reference, 0.0)?;
    }
    assert_close(&format!("{path:?}"), &ours, &reference, 1e-5)?;
    Ok(())
}

/// Keys and values read in place from views of longer buffers (a KV cache narrowed to the
/// positions it holds, also a view that starts past the buffer's first position), and from
/// views the op must copy (keys transposed), give the outputs of the same data made contiguous:
/// the decoding step's layout, checked for every case's shape.
#[test]
fn keys_and_values_inside_longer_buffers() -> Result<()> {
    let dev = wick::device::test_device()?;
    let mut rng = StdRng::seed_from_u64(6);
    for (i, (b, h, lq, lk, d, causal, pad)) in cases().into_iter().enumerate() {
        let what = format!("case {i} (b {b} h {h} q {lq} kv {lk} d {d})");
        let q = randn(&mut rng, &[b, h, lq, d], 1.5, &dev)?;
        let (cache_k, cache_v) = (randn(&mut rng, &[b, h, lk + 7, d], 1.5, &dev)?, randn(&mut rng, &[b, h, lk + 7, d], 1.0, &dev)?);
        let mask = mask_for(&pad, lk, &dev)?;
        for start in [0, 3] {
            let (k, v) = (cache_k.narrow(2, start, lk)?, cache_v.narrow(2, start, lk)?);
            assert!(b * h == 1 || !(k.is_contiguous() || v.is_contiguous()));
            let viewed = fused_attention(&q, &k, &v, mask.as_ref(), 0.3, causal)?;
            let copied = fused_attention(&q, &k.contiguous()?, &v.contiguous()?, mask.as_ref(), 0.3, causal)?;
            assert_close(&format!("{what} from position {start}"), &viewed, &copied, 0.0)?;
            // keys and values laid out differently, each read in place
            let v_other = v.contiguous()?;
            let mixed = fused_attention(&q, &k, &v_other, mask.as_ref(), 0.3, causal)?;
            assert_close(&format!("{what} mixed layouts"), &mixed, &copied, 0.0)?;
        }
        let k_transposed = cache_k.narrow(2, 0, lk)?.contiguous()?.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        let copied = fused_attention(&q, &cache_k.narrow(2, 0, lk)?.contiguous()?, &cache_v.narrow(2, 0, lk)?.contiguous()?, mask.as_ref(), 0.3, causal)?;
        let got = fused_attention(&q, &k_transposed, &cache_v.narrow(2, 0, lk)?, mask.as_ref(), 0.3, causal)?;
        assert_close(&format!("{what} keys transposed in memory"), &got, &copied, 0.0)?;
    }
    Ok(())
}

#[test]
fn shapes_are_checked() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev)?;
    let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?;
    let bad = Tensor::zeros((1, 2, 4, 16), DType::F32, &dev)?;
    assert!(fused_attention(&q, &k, &bad, None, 1.0, false).is_err());
    let bad_mask = Tensor::zeros((1, 3), DType::U8, &dev)?;
    assert!(fused_attention(&q, &k, &k, Some(&bad_mask), 1.0, false).is_err());
    Ok(())
}

/// PyTorch's scaled_dot_product_attention (outputs and the gradients of q, k, v of
/// sum(out * w)) against both implementations.
#[test]
fn both_match_pytorch_sdpa() -> Result<()> {
    let fx = Fixture::load("attention")?;
    let cases = fx.get("cases")?.to_vec2::<u32>()?;
    assert!(!cases.is_empty());
    for (c, row) in cases.iter().enumerate() {
        let causal = row[0] != 0;
        let has_mask = row[1] != 0;
        let get = |n: &str| fx.get(&format!("case{c}.{n}"));
        let (q, k, v, w) = (Var::from_tensor(&get("q")?)?, Var::from_tensor(&get("k")?)?, Var::from_tensor(&get("v")?)?, get("w")?);
        let mask = if has_mask { Some(get("mask")?) } else { None };
        let scale = get("scale")?.to_vec1::<f32>()?[0] as f64;
        for (name, f) in [("fused", fused_attention as fn(_, _, _, _, _, _) -> _), ("reference", reference_attention)] {
            let out: Tensor = f(&q, &k, &v, mask.as_ref(), scale, causal)?;
            assert_close(&format!("case {c} {name} output"), &out, &get("out")?, 1e-5)?;
            let grads = (&out * &w)?.sum_all()?.backward()?;
            for (g, var) in [("q", &q), ("k", &k), ("v", &v)] {
                assert_close(&format!("case {c} {name} grad {g}"), grads.get(var).unwrap(), &get(&format!("grad_{g}"))?, 1e-4)?;
            }
        }
    }
    Ok(())
}

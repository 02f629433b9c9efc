//! The CUDA forward pass: launches our kernel from `src/kernels/fused_attention.cu` (PTX built by
//! build.rs with nvcc, embedded here, loaded once per device through candle's module cache).
//!
//! Two kernels: `fused_attention_*` on CUDA cores (every dtype, head_dim 32/64/128; the default)
//! and `fused_attention_wmma_*` on tensor cores (f16/bf16, head_dim 64/128), used when
//! `WICK_ATTENTION_CUDA_KERNEL=wmma` (read once) until it has been checked on a GPU.

use super::FusedAttention;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_attention.ptx"));
const MODULE: &str = "wick_fused_attention";
/// Query rows per block and threads per block (BR, WBR and THREADS in the kernel).
const BR: u32 = 32;
const WBR: u32 = 64;
const THREADS: u32 = 128;

/// Whether f16/bf16 use the tensor-core kernel (WICK_ATTENTION_CUDA_KERNEL=wmma).
fn use_wmma() -> bool {
    static WMMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WMMA.get_or_init(|| std::env::var("WICK_ATTENTION_CUDA_KERNEL").is_ok_and(|v| v.eq_ignore_ascii_case("wmma")))
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("fused attention: {what} is not contiguous")))
}

pub(super) fn forward(
    op: &FusedAttention,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (b, h, lq, d) = l1.shape().dims4()?;
    let lk = l2.shape().dims4()?.2;
    let (o1, o2, o3) = (offsets(l1, "q")?, offsets(l2, "k")?, offsets(l3, "v")?);
    // The padding mask: (batch, kv_len) f32 on this device, read by pointer (0 when absent).
    let mask_guard = op.mask.as_ref().map(|m| m.storage_and_layout());
    let mask = match &mask_guard {
        None => None,
        Some((storage, layout)) => match &**storage {
            Storage::Cuda(cs) => {
                let (a, z) = offsets(layout, "key_mask")?;
                Some(cs.as_cuda_slice::<f32>()?.slice(a..z))
            }
            _ => candle_core::bail!("fused attention: key_mask is not on the CUDA device"),
        },
    };
    let args = Args { b, h, lq, lk, d, scale: op.scale, causal: op.causal };
    let out = match s1.dtype() {
        DType::F32 => launch::<f32>(&dev, "f32", s1, s2, s3, (o1, o2, o3), mask.as_ref(), &args)?,
        DType::F16 => launch::<half::f16>(&dev, "f16", s1, s2, s3, (o1, o2, o3), mask.as_ref(), &args)?,
        DType::BF16 => launch::<half::bf16>(&dev, "bf16", s1, s2, s3, (o1, o2, o3), mask.as_ref(), &args)?,
        other => candle_core::bail!("fused attention: unsupported dtype {other:?} on CUDA"),
    };
    Ok((out, l1.shape().clone()))
}

struct Args {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    scale: f32,
    causal: bool,
}

type Offsets = ((usize, usize), (usize, usize), (usize, usize));

fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    s1: &CudaStorage,
    s2: &CudaStorage,
    s3: &CudaStorage,
    (o1, o2, o3): Offsets,
    mask: Option<&candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>>,
    a: &Args,
) -> Result<CudaStorage> {
    if !matches!(a.d, 32 | 64 | 128) {
        candle_core::bail!("fused attention on CUDA: head_dim {} (32, 64 or 128)", a.d);
    }
    let q = s1.as_cuda_slice::<T>()?.slice(o1.0..o1.1);
    let k = s2.as_cuda_slice::<T>()?.slice(o2.0..o2.1);
    let v = s3.as_cuda_slice::<T>()?.slice(o3.0..o3.1);
    let n = a.b * a.h * a.lq * a.d;
    // SAFETY: every element is written by the kernel (each live row writes its D outputs).
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n.max(1))? };
    if n == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    }
    let wmma = suffix != "f32" && matches!(a.d, 64 | 128) && use_wmma();
    let (name, rows) = if wmma { (format!("fused_attention_wmma_{suffix}_d{}", a.d), WBR) } else { (format!("fused_attention_{suffix}_d{}", a.d), BR) };
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (heads, lq, lk) = (a.h as i32, a.lq as i32, a.lk as i32);
    let (causal, has_mask) = (a.causal as i32, mask.is_some() as i32);
    let null = 0u64; // a null device pointer: no logsumexp output (the CUDA backward recomputes)
    let mut builder = func.builder();
    builder.arg(&q);
    builder.arg(&k);
    builder.arg(&v);
    match mask {
        Some(m) => builder.arg(m),
        None => builder.arg(&null),
    };
    builder.arg(&out);
    builder.arg(&null);
    builder.arg(&heads);
    builder.arg(&lq);
    builder.arg(&lk);
    builder.arg(&a.scale);
    builder.arg(&causal);
    builder.arg(&has_mask);
    let cfg = LaunchConfig { grid_dim: ((a.lq as u32).div_ceil(rows), (a.b * a.h) as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the argument list matches the kernel's signature (pointers, 5 ints, a float, in order).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

//! Layers and losses that candle lacks, or has only in forms that cut the autograd graph.

use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    static DROPOUT_RNG: RefCell<rand::rngs::StdRng> = RefCell::new(rand::rngs::StdRng::seed_from_u64(0));
}

/// Makes every random draw of one training step a function of `(seed, step)` alone, so a run
/// resumed from a checkpoint draws the same dropout masks as the uninterrupted run.
/// candle's CPU backend cannot be seeded, which is why CPU masks come from our own generator.
pub fn reseed(device: &Device, seed: u64, step: u64) -> Result<()> {
    let mixed = splitmix64(seed ^ splitmix64(step));
    DROPOUT_RNG.with(|rng| *rng.borrow_mut() = rand::rngs::StdRng::seed_from_u64(mixed));
    if !device.is_cpu() {
        device.set_seed(mixed)?;
    }
    Ok(())
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout: active only when `train`; kept values are scaled by 1/(1-p).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    let keep = if x.device().is_cpu() {
        let n = x.elem_count();
        let scale = 1.0 / (1.0 - p) as f32;
        let mask: Vec<f32> = DROPOUT_RNG.with(|rng| {
            let mut rng = rng.borrow_mut();
            (0..n).map(|_| if rng.random::<f64>() >= p { scale } else { 0.0 }).collect()
        });
        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
    } else {
        let r = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        (r.ge(p)?.to_dtype(DType::F32)? * (1.0 / (1.0 - p)))?.to_dtype(x.dtype())?
    };
    x.mul(&keep)
}

/// Cross-entropy (mean over items) for logits of any rank: the last dimension holds the classes,
/// every other dimension is flattened into items; `targets` has the logits' shape minus the last
/// dimension. Computed in f32 whatever the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), classes))?.to_dtype(DType::F32)?;
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?;
    if targets.dim(0)? != logits.dim(0)? {
        candle_core::bail!(
            "cross_entropy: {} targets for {} rows of logits",
            targets.dim(0)?,
            logits.dim(0)?
        )
    }
    candle_nn::loss::cross_entropy(&logits, &targets)
}

/// LayerNorm over the last dimension from plain ops, so every input gets a gradient
/// (`candle_nn::LayerNorm` on contiguous input uses a fused op without a backward pass).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    let scaled = normed.broadcast_mul(weight)?;
    match bias {
        Some(b) => scaled.broadcast_add(b),
        None => Ok(scaled),
    }
}

/// Indices of the largest value along the last dimension, as u32 on the CPU.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.flatten_all()?.to_dtype(DType::U32)?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_is_seeded_and_scaled() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((1000,), DType::F32, &dev)?;
        reseed(&dev, 7, 3)?;
        let a = dropout(&x, 0.25, true)?.to_vec1::<f32>()?;
        reseed(&dev, 7, 3)?;
        let b = dropout(&x, 0.25, true)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        let kept = a.iter().filter(|v| **v > 0.0).count();
        assert!((650..850).contains(&kept), "kept {kept}");
        assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(dropout(&x, 0.25, false)?.to_vec1::<f32>()?, vec![1.0; 1000]);
        Ok(())
    }

    #[test]
    fn cross_entropy_of_rank3_logits_matches_rank2() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev)?;
        let targets = Tensor::new(&[[0u32, 4, 2], [1, 1, 3]], &dev)?;
        let a = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let b = candle_nn::loss::cross_entropy(&logits.reshape((6, 5))?, &targets.flatten_all()?)?
            .to_scalar::<f32>()?;
        assert!((a - b).abs() < 1e-6);
        assert!(cross_entropy(&logits, &Tensor::new(&[0u32, 1], &dev)?).is_err());
        Ok(())
    }

    #[test]
    fn layer_norm_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1.0, (3, 8), &dev)?;
        let w = candle_core::Var::randn(0f32, 1.0, 8, &dev)?;
        let b = candle_core::Var::randn(0f32, 1.0, 8, &dev)?;
        let ours = layer_norm(&x, &w, Some(&b), 1e-5)?;
        let theirs = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let grads = ours.sqr()?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            assert!(grads.get(v).is_some());
        }
        Ok(())
    }
}

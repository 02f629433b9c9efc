//! Layers and losses that candle lacks, or has only in forms that cut the autograd graph.

use candle_core::{DType, Device, Result, Shape, Tensor, Var, D};
use candle_nn::{Init, VarBuilder, VarMap};
use std::sync::Mutex;
use rand::{Rng, RngCore, SeedableRng};
use std::cell::RefCell;

thread_local! {
    // Seeds of the CPU dropout masks (one draw per dropout op: the masks themselves are hashes of
    // (seed, element), see `ops::dropout`). Xoshiro256++ is ample for seeds.
    static DROPOUT_RNG: RefCell<rand::rngs::SmallRng> = RefCell::new(rand::rngs::SmallRng::seed_from_u64(0));
}

/// Makes every random draw of one training step a function of `(seed, step)` alone, so a run
/// resumed from a checkpoint draws the same dropout masks as the uninterrupted run.
/// candle's CPU backend cannot be seeded, which is why CPU masks come from our own generator.
pub fn reseed(device: &Device, seed: u64, step: u64) -> Result<()> {
    let mixed = splitmix64(seed ^ splitmix64(step));
    DROPOUT_RNG.with(|rng| *rng.borrow_mut() = rand::rngs::SmallRng::seed_from_u64(mixed));
    if !device.is_cpu() {
        device.set_seed(mixed)?;
    }
    Ok(())
}

/// One number from the dropout generator: the seed of one dropout op's mask (plain dropout,
/// `dropout_add`, the fused attention's), so that [`reseed`] fixes those masks too.
pub(crate) fn draw_dropout_seed() -> u64 {
    DROPOUT_RNG.with(|rng| rng.borrow_mut().next_u64())
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
    if x.device().is_cpu() {
        // Masks from our seeded hash (candle's CPU generator cannot be seeded): one fused pass
        // each way, the mask regenerated in the backward pass (a mask tensor and a product
        // with `WICK_OPS=reference`, the same mask).
        return crate::ops::dropout::dropout(x, p);
    }
    let r = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    let keep = (r.ge(p)?.to_dtype(DType::F32)? * (1.0 / (1.0 - p)))?.to_dtype(x.dtype())?;
    x.mul(&keep)
}

/// `dropout(x, p, train) + residual`: a transformer's residual connection, one fused op on the CPU.
pub fn dropout_add(x: &Tensor, residual: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return x + residual;
    }
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability must be in [0, 1), got {p}")
    }
    if x.device().is_cpu() {
        return crate::ops::dropout::dropout_add(x, residual, p);
    }
    dropout(x, p, train)? + residual
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
    if crate::ops::fused_path(logits.device()) {
        // One pass each way instead of a dozen (items × classes) temporaries.
        return crate::ops::cross_entropy::cross_entropy_cpu(&logits, &targets);
    }
    candle_nn::loss::cross_entropy(&logits, &targets)
}

/// LayerNorm over the last dimension with a gradient for every input: our fused op on f32 CPU
/// tensors (one pass forward, one backward), candle's fused kernel when nothing needs a gradient
/// (`candle_nn::LayerNorm` has no backward pass, silently), plain ops otherwise. (Off the fused
/// path, `WICK_OPS=reference`, the CPU takes the choice other devices make.)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if let Some(bias) = bias {
        if crate::ops::fused_path(x.device()) && x.dtype() == DType::F32 {
            return crate::ops::norm::layer_norm(x, weight, bias, eps);
        }
        let tracked = x.track_op() || weight.track_op() || bias.track_op();
        if !tracked && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, weight, bias, eps as f32);
        }
    }
    layer_norm_plain(x, weight, bias, eps)
}

/// LayerNorm from plain differentiable ops, statistics in f32 (any device and dtype).
pub fn layer_norm_plain(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
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

/// LayerNorm with transformers' parameter names (`weight`, `bias`), new ones initialised to 1 and
/// 0, through [`layer_norm`] (so it has gradients when training and is fused when not).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, Some(&self.bias), self.eps)
    }
}

/// Softmax over the last dimension that keeps the autograd graph when anything needs a gradient
/// (`candle_nn::ops::softmax_last_dim` has no backward pass) and is the fused kernel otherwise.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

pub use crate::ops::pool::max_pool2d;

/// Batch normalisation over (batch, H, W) for (batch, C, H, W) inputs, as PyTorch's
/// `BatchNorm2d`: batch statistics in training (biased variance to normalise, unbiased for the
/// running update), running statistics in evaluation. Statistics are computed in f32 whatever
/// the input's dtype (candle-nn's version fails in f16/bf16 training).
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// `weight`, `bias`, `running_mean`, `running_var`: PyTorch's names.
    pub fn load(vb: VarBuilder, channels: usize, eps: f64, momentum: f64) -> Result<Self> {
        let get = |name: &str, value: f64| vb.get_with_hints(channels, name, Init::Const(value));
        Ok(Self {
            weight: get("weight", 1.0)?,
            bias: get("bias", 0.0)?,
            running_mean: Var::from_tensor(&get("running_mean", 0.0)?)?,
            running_var: Var::from_tensor(&get("running_var", 1.0)?)?,
            eps,
            momentum,
        })
    }
}

impl candle_nn::ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        // (C, B·H·W): every statistic is then a reduction over the last, contiguous dimension;
        // candle's reductions over strided dimensions (0, 2, 3) are many times slower.
        let x = x.to_dtype(DType::F32)?.transpose(0, 1)?.reshape((c, b * h * w))?;
        let (centered, var) = if train {
            let mean = x.mean_keepdim(1)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(1)?;
            let n = (b * h * w) as f64;
            let m = self.momentum;
            let update = |running: &Var, batch: Tensor| -> Result<()> {
                let old = running.as_tensor().to_dtype(DType::F32)?;
                running.set(&((old * (1.0 - m))? + (batch.detach().flatten_all()? * m)?)?.to_dtype(running.dtype())?)
            };
            update(&self.running_mean, mean)?;
            update(&self.running_var, (&var * (n / (n - 1.0).max(1.0)))?)?;
            (centered, var)
        } else {
            let mean = self.running_mean.as_tensor().to_dtype(DType::F32)?.reshape((c, 1))?;
            let var = self.running_var.as_tensor().to_dtype(DType::F32)?.reshape((c, 1))?;
            (x.broadcast_sub(&mean)?, var)
        };
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        let out = normed.broadcast_mul(&self.weight.reshape((c, 1))?)?.broadcast_add(&self.bias.reshape((c, 1))?)?;
        out.reshape((c, b, h, w))?.transpose(0, 1)
    }
}

/// Indices of the largest value along the last dimension, as u32 on the CPU.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.flatten_all()?.to_dtype(DType::U32)?.to_vec1()
}

/// A `VarBuilder` over `varmap` whose new variables are drawn from a generator seeded with
/// `seed` (candle's own initialisers use an unseedable CPU generator), so the same seed gives the
/// same initial model. Variables already in the map are returned as they are.
pub fn var_builder(varmap: &VarMap, dtype: DType, device: &Device, seed: u64) -> VarBuilder<'static> {
    let backend = SeededVarMap { varmap: varmap.clone(), rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)) };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

struct SeededVarMap {
    varmap: VarMap,
    rng: Mutex<rand::rngs::StdRng>,
}

impl SeededVarMap {
    fn sample(&self, init: Init, shape: &Shape) -> Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().unwrap();
        let uniform = |rng: &mut rand::rngs::StdRng, lo: f64, up: f64| -> Vec<f32> { (0..n).map(|_| rng.random_range(lo..=up) as f32).collect() };
        let normal = |rng: &mut rand::rngs::StdRng, mean: f64, std: f64| -> Result<Vec<f32>> {
            let d = rand_distr::Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(format!("bad init: {e}")))?;
            Ok((0..n).map(|_| rng.sample(d) as f32).collect())
        };
        let values = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev)?,
            Init::Kaiming { dist, fan, non_linearity } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Uniform => uniform(&mut rng, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
                    candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, 0.0, std)?,
                }
            }
        };
        Tensor::from_vec(values, shape, &Device::Cpu)
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Some(var) = self.varmap.data().lock().unwrap().get(name) {
            if var.shape() != &shape {
                candle_core::bail!("variable {name} has shape {:?}, asked for {shape:?}", var.dims())
            }
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&self.sample(init, &shape)?.to_dtype(dtype)?.to_device(device)?)?;
        self.varmap.data().lock().unwrap().insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        match self.varmap.data().lock().unwrap().get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype)?.to_device(device),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().unwrap().contains_key(name)
    }
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

    #[test]
    fn seeded_var_builder_is_reproducible() -> Result<()> {
        let make = |seed| -> Result<Vec<f32>> {
            let vm = VarMap::new();
            let vb = var_builder(&vm, DType::F32, &Device::Cpu, seed);
            let l = candle_nn::linear(4, 3, vb.pp("l"))?;
            let again = vb.pp("l").get((3, 4), "weight")?;
            assert_eq!(again.flatten_all()?.to_vec1::<f32>()?, l.weight().flatten_all()?.to_vec1::<f32>()?);
            assert_eq!(vm.all_vars().len(), 2);
            l.weight().flatten_all()?.to_vec1()
        };
        assert_eq!(make(1)?, make(1)?);
        assert_ne!(make(1)?, make(2)?);
        Ok(())
    }
}

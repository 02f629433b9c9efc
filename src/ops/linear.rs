//! A linear layer as one autograd node: `y = x·Wᵀ + b` (PyTorch `Linear`, W is (out, in)) or
//! `y = x·W + b` (GPT-2's `Conv1D`, W is (in, out)), optionally followed by ReLU in the same node.
//!
//! Why not `x.matmul(&w.t())?.broadcast_add(&b)?.relu()`: in candle that is four graph nodes, and
//! its backward adds the weight gradient through a transposed (strided) view and reduces the bias
//! gradient over a strided dimension, both slow on the CPU, and each node's gradient costs a
//! buffer of its own (in candle 0.11.1 as released, a zero-filled one plus an add; see
//! `vendor/README.md`). Here the forward is one GEMM with the bias preloaded into the
//! output and the ReLU applied in place (no second activation-sized buffer); the backward is one
//! op that masks dY by y > 0 (ReLU only), then writes dW (a GEMM straight into the weight's own
//! layout), db (column sums of dY) and dX (a GEMM) into one buffer that the three gradients view.
//! dX is skipped when the input is not tracked (a model's first layer on its data): for an MLP's
//! 784-wide first layer that product is a quarter of a training step's arithmetic.
//!
//! [`Dense`] is the one linear layer every model uses (PyTorch's and GPT-2's layouts). Its
//! forward pass chooses between this op and [`super::matvec`]: f32 products with many rows or
//! a gradient to track take the GEMM here; decoding-sized products (a few rows) and f16/bf16
//! weights on the CPU take the matrix-vector kernels, which read the weight once as stored.
//! A quantized layer ([`Dense::set_quantized`], see [`crate::quant`]) takes a quantized product
//! instead: our kernels for q8_0 / q4_0 on the CPU, candle's for the other types and devices;
//! inference only, it has no backward pass.

use super::cpu_f32;
pub use super::gemm::Panels;
use super::gemm::{matmul_into, matmul_new, PackedWeight, View};
use super::matvec::{matmul_weight, RepackedQ4, WeightData, MATVEC_ROWS};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// How the weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// (out, in), as `torch.nn.Linear`.
    OutIn,
    /// (in, out), as GPT-2's `Conv1D`.
    InOut,
}

/// `x` (..., in) → (..., out). Differentiable in `x`, `weight` and `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    fused_or_reference(x, weight, bias, layout, false)
}

/// `relu(linear(x))` as one node. ReLU's gradient is PyTorch's: dY passes where y > 0 (or y is
/// NaN), so an exact zero gets none (candle's own `relu` passes it at 0).
pub fn linear_relu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    fused_or_reference(x, weight, bias, layout, true)
}

fn fused_or_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout, relu: bool) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.dtype() == DType::F32;
    match bias {
        Some(b) if super::fused_path(x.device()) && f32(x) && f32(weight) && f32(b) => fused_linear(x, weight, b, layout, relu),
        _ => {
            let y = reference_linear(x, weight, bias, layout)?;
            if relu {
                y.relu()
            } else {
                Ok(y)
            }
        }
    }
}

/// The fused op itself (f32 CPU tensors), whatever the path: what the tests compare.
fn fused_linear(x: &Tensor, weight: &Tensor, bias: &Tensor, layout: WeightLayout, relu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear { layout, relu })
}

/// The same with plain candle ops (other devices and dtypes, and the tests' reference).
pub fn reference_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let d_in = x.dim(D::Minus1)?;
    let w = match layout {
        WeightLayout::OutIn => weight.t()?,
        WeightLayout::InOut => weight.clone(),
    };
    let mut dims = x.dims().to_vec();
    let y = x.reshape(((), d_in))?.matmul(&w)?;
    *dims.last_mut().unwrap() = y.dim(1)?;
    let y = y.reshape(dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A linear layer's parameters (checkpoint names `weight`, `bias`) and their layout.
#[derive(Clone, Debug)]
pub struct Dense {
    /// The weight as stored (see `layout`). In a quantized layer, a stand-in of the same shape
    /// that holds no memory (one zero, broadcast): the product reads `quantized`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
    /// The weight quantized, (out, in) whatever `layout` is: when set, products use it.
    quantized: Option<Arc<QTensor>>,
    /// The f32 weight packed for inference ([`Dense::pack_for_inference`]): when set, products
    /// use it.
    packed: Option<Arc<PackedWeight>>,
    /// A q4_0 `quantized` weight repacked for decoding ([`Dense::pack_for_inference`]): when set,
    /// products of one or two rows use it.
    q4_decode: Option<Arc<RepackedQ4>>,
}

impl Dense {
    pub fn new(weight: Tensor, bias: Option<Tensor>, layout: WeightLayout) -> Self {
        Self { weight, bias, layout, quantized: None, packed: None, q4_decode: None }
    }

    /// Packs the f32 weight (for decoding at AVX2 also an f16 or bf16 one, kept in its 2 bytes) once
    /// into the panels of our product ([`PackedWeight`]: `panels` says for which products) and
    /// drops it as stored (a zero-memory stand-in of its shape
    /// stays in `weight`), so that every product reads the panels: inference only, since a
    /// packed layer has no gradient. Returns whether it packed; nothing changes off the CPU (or
    /// with `WICK_OPS=reference`), at kernel levels without those panels, for other dtypes, for
    /// packed layers, for weights that are trained (`Var`s), and for encoder batches
    /// ([`Panels::ManyRows`]) in layers of fewer than 64 outputs. For decoding
    /// ([`Panels::FewRows`]) a q4_0 layer whose input width is a multiple of 128 keeps its
    /// quantized weight and gains a copy in the decoding layout of `matvec::q4_decode` (at
    /// AVX-512 VNNI; as many bytes again) for products of one or two rows.
    pub fn pack_for_inference(&mut self, panels: Panels) -> Result<bool> {
        // Half-precision panels pay at AVX2 only. At AVX-512 the matrix-vector kernels, reading
        // the weight as stored and widening it with AVX512-FP16/BF16, decode faster: bf16 GPT-2
        // on the Intel Xeon, 85.5 / 85.5 / 78.5 tok/s as stored against 64.2 / 57.7 / 64.4
        // packed at batch 1, 353 / 318 / 299 against 209 / 211 / 217 at batch 8
        // (`notes/cpu-speed.md`, session 16). On an AMD EPYC (Zen 5), one thread: bf16 as stored
        // 25–27 GB/s, packed through the zmm few-rows tile 20–21 (session 18).
        self.pack(panels, crate::cpu::isa() == crate::cpu::Isa::Avx2)
    }

    /// [`Self::pack_for_inference`], packing f16 and bf16 weights for decoding where `half_panels`.
    fn pack(&mut self, panels: Panels, half_panels: bool) -> Result<bool> {
        if let Some(q) = &self.quantized {
            if panels != Panels::FewRows || self.q4_decode.is_some() || q.dtype() != GgmlDType::Q4_0 || !q.device().is_cpu() || !super::fused_path(&q.device()) || !RepackedQ4::available() {
                return Ok(false);
            }
            let (n, k) = q.shape().dims2()?;
            let Some(repacked) = RepackedQ4::new(&q.data()?, n, k)? else { return Ok(false) };
            self.q4_decode = Some(Arc::new(repacked));
            return Ok(true);
        }
        let w = &self.weight;
        let half = half_panels && matches!(w.dtype(), DType::F16 | DType::BF16) && panels == Panels::FewRows;
        if self.packed.is_some() || !super::fused_path(w.device()) || !(w.dtype() == DType::F32 || half) || w.track_op() || !PackedWeight::available() {
            return Ok(false);
        }
        let (d_out, d_in) = self.out_in()?;
        if panels == Panels::ManyRows && d_out < 64 {
            // (A head of a few outputs: the 12×32 tiles would be mostly padding.)
            return Ok(false);
        }
        // The product is x · B with B (in × out): the weight itself, or the transpose of (out, in).
        let (rs, cs) = match self.layout {
            WeightLayout::InOut => (d_out, 1),
            WeightLayout::OutIn => (1, d_in),
        };
        let packed = if half {
            let w = w.contiguous()?;
            let (storage, layout) = w.storage_and_layout();
            let candle_core::Storage::Cpu(storage) = &*storage else { return Ok(false) };
            let bits = match super::matvec::weight_data(storage, layout)? {
                WeightData::F16(bits) | WeightData::Bf16(bits) => bits,
                WeightData::F32(_) => unreachable!("a half-precision weight"),
            };
            PackedWeight::new_half(bits, rs, cs, d_in, d_out, w.dtype())?
        } else {
            let data = w.flatten_all()?.to_vec1::<f32>()?;
            PackedWeight::new(View { data: &data, rs, cs }, d_in, d_out, panels)?
        };
        let Some(packed) = packed else { return Ok(false) };
        self.weight = stand_in(w.shape(), w.dtype(), w.device())?;
        self.packed = Some(Arc::new(packed));
        Ok(true)
    }

    /// `x` (..., in) → (..., out) through the packed weight, in f32 (x read in place when it is
    /// contiguous f32), with the bias and optionally ReLU.
    fn packed_forward(&self, packed: &PackedWeight, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (k, n) = packed.dims();
        if x.dim(D::Minus1)? != k {
            candle_core::bail!("linear layer: input {:?} for {k} inputs", x.dims())
        }
        let m = x.elem_count() / k.max(1);
        let bias = self.bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!("linear layer: a bias of {} for {n} outputs", bias.map_or(0, |b| b.len()))
        }
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let mut y = {
            let (storage, layout) = x32.storage_and_layout();
            let candle_core::Storage::Cpu(storage) = &*storage else { candle_core::bail!("linear layer: a packed weight needs its input on the CPU") };
            packed.product_new(cpu_f32(storage, layout, "packed product")?, m, bias.as_deref())?
        };
        if relu {
            // PyTorch's ReLU: NaN stays NaN.
            y.iter_mut().for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = n;
        Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())
    }

    /// (out, in) of this layer.
    pub fn out_in(&self) -> Result<(usize, usize)> {
        let (d_in, d_out) = in_out(self.layout, self.weight.layout())?;
        Ok((d_out, d_in))
    }

    /// The quantized weight, (out, in), when this layer is quantized.
    pub fn quantized(&self) -> Option<&Arc<QTensor>> {
        self.quantized.as_ref()
    }

    /// Makes products use `weight`, a quantized (out, in) matrix of this layer's shape, and
    /// drops the unquantized weight (a zero-memory stand-in of its shape stays in `weight`).
    pub fn set_quantized(&mut self, weight: Arc<QTensor>) -> Result<()> {
        let (d_out, d_in) = self.out_in()?;
        if weight.shape().dims() != [d_out, d_in] {
            candle_core::bail!("a quantized weight of shape {:?} for a linear layer of (out, in) = ({d_out}, {d_in})", weight.shape().dims())
        }
        self.weight = stand_in(self.weight.shape(), self.weight.dtype(), &weight.device())?;
        self.quantized = Some(weight);
        // (A decoding copy of an earlier weight would be stale.)
        self.q4_decode = None;
        Ok(())
    }

    /// `x` (..., in) → (..., out) in x's dtype through the quantized weight: our kernels for a
    /// few rows of q8_0 / q4_0 ([`super::matvec::quantized_matmul`]), candle's otherwise; both
    /// quantize the activations too (see [`crate::quant`]) and compute in f32.
    fn quantized_forward(&self, weight: &QTensor, x: &Tensor, relu: bool) -> Result<Tensor> {
        let y = match super::matvec::quantized_matmul(x, weight, self.q4_decode.as_deref(), self.bias.as_ref())? {
            Some(y) => y,
            None => {
                let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(weight)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                    None => y,
                }
            }
        };
        let y = if relu { y.relu()? } else { y };
        y.to_dtype(x.dtype())
    }

    /// A PyTorch-layout layer with candle-nn's `linear` initialisation (Kaiming-normal weight,
    /// U(±1/√in) bias), under candle-nn's names, so it can replace `candle_nn::linear`.
    pub fn load(vb: candle_nn::VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        let weight = vb.get_with_hints((d_out, d_in), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bound = 1.0 / (d_in as f64).sqrt();
        let bias = vb.get_with_hints(d_out, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self::new(weight, Some(bias), WeightLayout::OutIn))
    }

    /// A layer stored as `layout` with transformers' initialisation when new: weight
    /// N(0, `std`²), bias 0 (BERT's `Linear`, GPT-2's `Conv1D`).
    pub fn load_normal(vb: candle_nn::VarBuilder, d_in: usize, d_out: usize, std: f64, layout: WeightLayout) -> Result<Self> {
        let shape = match layout {
            WeightLayout::OutIn => (d_out, d_in),
            WeightLayout::InOut => (d_in, d_out),
        };
        let weight = vb.get_with_hints(shape, "weight", candle_nn::Init::Randn { mean: 0.0, stdev: std })?;
        let bias = vb.get_with_hints(d_out, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self::new(weight, Some(bias), layout))
    }

    /// `relu(self.forward(x))` as one node (see [`linear_relu`]).
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quantized {
            return self.quantized_forward(q, x, true);
        }
        if let Some(p) = &self.packed {
            return self.packed_forward(p, x, true);
        }
        linear_relu(x, &self.weight, self.bias.as_ref(), self.layout)
    }

    /// Whether `x`'s product goes to the GEMM ([`linear`]) rather than the matrix-vector
    /// kernels ([`matmul_weight`]): always off the CPU; on it, f32 weights with more than
    /// [`MATVEC_ROWS`] rows or a gradient to track (the fused GEMM's backward is the fastest).
    fn gemm(&self, x: &Tensor) -> Result<bool> {
        if !x.device().is_cpu() {
            return Ok(true);
        }
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let tracked = x.track_op() || self.weight.track_op();
        Ok(x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 && (rows > MATVEC_ROWS || tracked))
    }
}

impl candle_core::Module for Dense {
    /// `x` (..., in) → (..., out) in x's dtype. On the CPU a model may keep f16/bf16 weights
    /// with f32 activations: those products compute in f32 (see [`matmul_weight`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quantized {
            return self.quantized_forward(q, x, false);
        }
        if let Some(p) = &self.packed {
            return self.packed_forward(p, x, false);
        }
        if self.gemm(x)? {
            linear(x, &self.weight, self.bias.as_ref(), self.layout)
        } else {
            matmul_weight(x, &self.weight, self.bias.as_ref(), self.layout)
        }
    }
}

/// A tensor of `shape` that holds one element (a zero, broadcast): the placeholder of a weight
/// that lives elsewhere (quantized), so that shape checks still see its shape.
pub fn stand_in(shape: &Shape, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::zeros((), dtype, device)?.broadcast_as(shape)
}

struct Linear {
    layout: WeightLayout,
    relu: bool,
}

/// (in, out) of a weight stored as `layout`.
fn in_out(layout: WeightLayout, w: &Layout) -> Result<(usize, usize)> {
    let (a, b) = w.shape().dims2()?;
    Ok(match layout {
        WeightLayout::OutIn => (b, a),
        WeightLayout::InOut => (a, b),
    })
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "wick-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d_in, d_out) = in_out(self.layout, wl)?;
        let x = cpu_f32(xs, xl, "linear")?;
        let w = cpu_f32(ws, wl, "linear")?;
        let b = cpu_f32(bs, bl, "linear")?;
        let x_in = *xl.shape().dims().last().unwrap_or(&0);
        if x_in != d_in || b.len() != d_out {
            candle_core::bail!("linear: input {:?}, weight {:?} ({:?}), bias {:?} do not fit", xl.dims(), wl.dims(), self.layout, bl.dims())
        }
        let rows = x.len() / d_in.max(1);
        // Element (k, j) of the right operand is W[j, k] (OutIn) or W[k, j] (InOut).
        let rhs = match self.layout {
            WeightLayout::OutIn => View::transposed(w, d_in),
            WeightLayout::InOut => View::rows(w, d_out),
        };
        let mut y = matmul_new(rows, d_out, d_in, View::rows(x, d_in), rhs, Some(b))?; // y = bias rows + x·W
        if self.relu {
            // `< 0` keeps NaN, as PyTorch's relu does.
            y.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = d_out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (d_in, d_out) = (x.dim(D::Minus1)?, b.dim(0)?);
        let grad = grad.contiguous()?;
        let dz = if self.relu { y.apply_op2_no_bwd(&grad, &ReluMask)? } else { grad };
        // An untracked input (data, not a function of any variable) needs no gradient.
        let need_dx = x.track_op();
        let packed = x.apply_op3_no_bwd(w, &dz, &LinearBackward { layout: self.layout, need_dx })?;
        let dx_len = if need_dx { x.elem_count() } else { 0 };
        let dw = packed.narrow(0, dx_len, d_in * d_out)?.reshape(w.shape())?;
        let db = packed.narrow(0, dx_len + d_in * d_out, d_out)?;
        let dx = if need_dx { Some(packed.narrow(0, 0, dx_len)?.reshape(x.shape())?) } else { None };
        Ok((dx, Some(dw), Some(db)))
    }
}

/// (y, dY) → dY where y > 0 or y is NaN, else 0: ReLU's backward from its output.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "wick-relu-mask"
    }
    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (cpu_f32(ys, yl, "relu backward")?, cpu_f32(gs, gl, "relu backward")?);
        if y.len() != g.len() {
            candle_core::bail!("relu backward: output {:?} and gradient {:?} differ", yl.dims(), gl.dims())
        }
        let dz = y.iter().zip(g).map(|(&y, &g)| if y <= 0.0 { 0.0 } else { g }).collect();
        Ok((CpuStorage::F32(dz), yl.shape().clone()))
    }
}

/// (x, W, dZ) → one flat buffer [dX (only with `need_dx`) | dW in W's layout | db].
struct LinearBackward {
    layout: WeightLayout,
    need_dx: bool,
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "wick-linear-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d_in, d_out) = in_out(self.layout, wl)?;
        let (x, w, dz) = (cpu_f32(xs, xl, "linear backward")?, cpu_f32(ws, wl, "linear backward")?, cpu_f32(gs, gl, "linear backward")?);
        let rows = dz.len() / d_out.max(1);
        if x.len() != rows * d_in || dz.len() != rows * d_out {
            candle_core::bail!("linear backward: input {:?}, weight {:?}, gradient {:?} do not fit", xl.dims(), wl.dims(), gl.dims())
        }
        let dx_len = if self.need_dx { rows * d_in } else { 0 };
        // db = 1ᵀ·dZ. Rows are split between threads only when there are many of them (GPT-2's
        // tokens); a partial sum per chunk, then a short serial sum.
        const ROWS_PER_TASK: usize = 256;
        let db = if rows > 2 * ROWS_PER_TASK {
            let mut db = vec![0f32; d_out];
            for p in dz.par_chunks(ROWS_PER_TASK * d_out).map(|chunk| column_sums(chunk, d_out)).collect::<Vec<_>>() {
                db.iter_mut().zip(p).for_each(|(d, s)| *d += s);
            }
            db
        } else {
            column_sums(dz, d_out)
        };
        let dz_rows = View::rows(dz, d_out);
        let (dw_view, dx_view) = match self.layout {
            // dW = dZᵀ·x, dX = dZ·W
            WeightLayout::OutIn => ((View::transposed(dz, d_out), View::rows(x, d_in), d_out, d_in), (dz_rows, View::rows(w, d_in))),
            // dW = xᵀ·dZ, dX = dZ·Wᵀ
            WeightLayout::InOut => ((View::transposed(x, d_in), dz_rows, d_in, d_out), (dz_rows, View::transposed(w, d_out))),
        };
        let mut result: Result<()> = Ok(());
        // SAFETY: every part is written whole: db copied, dW and dX (when it is there) by
        // products that write every element, or, should one refuse its buffers, zeros.
        let out = unsafe {
            super::written_once(dx_len + d_in * d_out + d_out, |out| {
                result = (|| {
                    let (dx, rest) = out.split_at_mut(dx_len);
                    let (dw, db_out) = rest.split_at_mut(d_in * d_out);
                    db_out.write_copy_of_slice(&db);
                    let ((a, b, m, n), (dz_rows, w_view)) = (dw_view, dx_view);
                    matmul_into(dw, n, m, n, rows, a, b, None)?;
                    if self.need_dx {
                        matmul_into(dx, d_in, rows, d_in, d_out, dz_rows, w_view, None)?;
                    }
                    Ok(())
                })();
                if result.is_err() {
                    out.fill(std::mem::MaybeUninit::new(0.0));
                }
            })
        };
        result?;
        Ok((CpuStorage::F32(out), Shape::from(dx_len + d_in * d_out + d_out)))
    }
}

fn column_sums(rows: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0f32; cols];
    for row in rows.chunks_exact(cols) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// A layer packed for inference, in either panels, gives its unpacked outputs (1e-4), with
    /// and without ReLU and bias, for one row and many (across the 12×32 kernel's 384 depths and
    /// 512 columns), in both layouts; a trained weight (a `Var`) is left as it is.
    #[test]
    fn a_packed_layer_gives_the_unpacked_outputs() -> Result<()> {
        use candle_core::Module;
        let dev = Device::Cpu;
        for panels in [Panels::FewRows, Panels::ManyRows] {
            if !PackedWeight::available() || !super::super::fused_path(&dev) {
                eprintln!("skipped {panels:?}: not at this level or on this path");
                continue;
            }
            for (layout, bias) in [(WeightLayout::OutIn, true), (WeightLayout::InOut, true), (WeightLayout::OutIn, false)] {
                let (d_in, d_out) = (400, 530);
                let shape = if layout == WeightLayout::OutIn { (d_out, d_in) } else { (d_in, d_out) };
                let bias = bias.then(|| Tensor::randn(0f32, 1.0, d_out, &dev)).transpose()?;
                let dense = Dense::new(Tensor::randn(0f32, 1.0, shape, &dev)?, bias, layout);
                let mut packed = dense.clone();
                assert!(packed.pack_for_inference(panels)?);
                assert!(!packed.pack_for_inference(panels)?, "packed twice");
                assert_eq!(packed.weight.dims(), dense.weight.dims());
                for rows in [1, 40, 70] {
                    let x = Tensor::randn(0f32, 1.0, (2, rows, d_in), &dev)?;
                    assert!(max_diff(&packed.forward(&x)?, &dense.forward(&x)?) < 1e-4, "{panels:?} {layout:?} rows {rows}");
                    assert!(max_diff(&packed.forward_relu(&x)?, &dense.forward_relu(&x)?) < 1e-4, "{panels:?} {layout:?} relu rows {rows}");
                }
                assert!(packed.forward(&Tensor::zeros((2, d_in - 1), DType::F32, &dev)?).is_err());
            }
            let mut trained = Dense::new(Var::randn(0f32, 1.0, (4, 8), &dev)?.as_tensor().clone(), None, WeightLayout::OutIn);
            assert!(!trained.pack_for_inference(panels)?);
            let mut head = Dense::new(Tensor::randn(0f32, 1.0, (2, 300), &dev)?, None, WeightLayout::OutIn);
            assert_eq!(head.pack_for_inference(panels)?, panels == Panels::FewRows, "a two-output head, {panels:?}");
        }
        Ok(())
    }

    /// For decoding, an f16 or bf16 layer packs in its own 2 bytes (`pack_for_inference` does so
    /// at AVX2 only) and gives the outputs of the same weight as stored (the matrix-vector kernels, 1e-4) for 1–16 rows and a prompt's
    /// 40, in both layouts, keeping its dtype; encoder panels (f32 only) leave it as it is.
    #[test]
    fn a_half_precision_layer_packed_for_decoding_gives_its_outputs_as_stored() -> Result<()> {
        use candle_core::Module;
        let dev = Device::Cpu;
        if !PackedWeight::available() || !super::super::fused_path(&dev) {
            eprintln!("skipped: not at this level or on this path");
            return Ok(());
        }
        for dtype in [DType::F16, DType::BF16] {
            for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                let (d_in, d_out) = (300, 530);
                let shape = if layout == WeightLayout::OutIn { (d_out, d_in) } else { (d_in, d_out) };
                let dense = Dense::new(Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(dtype)?, Some(Tensor::randn(0f32, 1.0, d_out, &dev)?), layout);
                assert!(!dense.clone().pack(Panels::ManyRows, true)?, "{dtype:?} in encoder panels");
                let level_packs = crate::cpu::isa() == crate::cpu::Isa::Avx2;
                assert_eq!(dense.clone().pack_for_inference(Panels::FewRows)?, level_packs, "{dtype:?} at this level");
                let mut packed = dense.clone();
                assert!(packed.pack(Panels::FewRows, true)?, "{dtype:?} {layout:?}");
                assert_eq!(packed.weight.dtype(), dtype);
                assert_eq!(packed.packed.as_ref().map(|p| p.dtype()), Some(dtype));
                for rows in [1, 3, 8, 11, 16, 40] {
                    let x = Tensor::randn(0f32, 1.0, (rows, d_in), &dev)?;
                    assert!(max_diff(&packed.forward(&x)?, &dense.forward(&x)?) < 1e-4, "{dtype:?} {layout:?} rows {rows}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matches_plain_ops_forward_and_backward_in_both_layouts() -> Result<()> {
        let dev = Device::Cpu;
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for relu in [false, true] {
                for (lead, d_in, d_out) in [(vec![2, 5], 7, 3), (vec![1], 1, 1), (vec![600], 13, 9), (vec![3, 1, 4], 33, 17)] {
                    let mut x_dims = lead.clone();
                    x_dims.push(d_in);
                    let mut y_dims = lead.clone();
                    y_dims.push(d_out);
                    let x = Var::from_tensor(&Tensor::randn(0f32, 1., x_dims, &dev)?)?;
                    let shape = if layout == WeightLayout::OutIn { (d_out, d_in) } else { (d_in, d_out) };
                    let w = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
                    let b = Var::from_tensor(&Tensor::randn(0f32, 1., d_out, &dev)?)?;
                    let probe = Tensor::randn(0f32, 1., y_dims, &dev)?;
                    let fused = fused_linear(&x, &w, &b, layout, relu)?;
                    let plain = reference_linear(&x, &w, Some(&b), layout)?;
                    let plain = if relu { plain.relu()? } else { plain };
                    assert!(max_diff(&fused, &plain) < 1e-4);
                    let gf = (fused * &probe)?.sum_all()?.backward()?;
                    let gp = (plain * &probe)?.sum_all()?.backward()?;
                    for v in [&x, &w, &b] {
                        let (a, r) = (gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap());
                        assert_eq!(a.dims(), r.dims());
                        assert!(max_diff(a, r) < 1e-3, "{layout:?} relu {relu} {:?}", v.dims());
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn untracked_input_gets_no_gradient_and_the_weights_still_do() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (9, 6), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 6), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (9, 4), &dev)?;
        let gf = (fused_linear(&x, &w, &b, WeightLayout::OutIn, true)? * &probe)?.sum_all()?.backward()?;
        let gp = (reference_linear(&x, &w, Some(&b), WeightLayout::OutIn)?.relu()? * &probe)?.sum_all()?.backward()?;
        assert!(gf.get(&x).is_none());
        for v in [&w, &b] {
            assert!(max_diff(gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap()) < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn relu_keeps_nan_and_gives_no_gradient_at_zero() -> Result<()> {
        let dev = Device::Cpu;
        // Rows of x·Wᵀ + b: -1 (clamped), 0 (exactly: no gradient, as PyTorch), NaN (kept).
        let x = Var::from_tensor(&Tensor::new(&[[1f32], [0.], [f32::NAN]], &dev)?)?;
        let w = Var::from_tensor(&Tensor::new(&[[-1f32]], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0f32], &dev)?)?;
        let y = fused_linear(&x, &w, &b, WeightLayout::OutIn, true)?;
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&v[..2], &[0.0, 0.0]);
        assert!(v[2].is_nan());
        let g = y.sum_all()?.backward()?;
        let dx = g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&dx[..2], &[0.0, 0.0]);
        Ok(())
    }
}

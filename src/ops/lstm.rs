//! The LSTM cell's elementwise part as one op: from the gate pre-activations (i, f, g, o, in
//! PyTorch's order) and the previous cell state to the new hidden and cell state.
//!
//! Written with candle ops the cell is about a dozen small tensors a time step forwards and twice
//! that backwards; at char-RNN sizes (batch 32, hidden 256) each op costs more in dispatch and
//! allocation than in arithmetic. Here it is one pass forwards and one backwards (CPU, f32);
//! other devices and dtypes, and `WICK_OPS=reference`, use the candle-ops formulation,
//! [`lstm_cell_ops`].
//!
//! The forward pass keeps the activated gates and tanh(c) beside h and c (B × 7H), so the
//! backward pass is arithmetic only: the transcendental functions (libm's tanhf above all) were
//! the largest cost of the cell when the backward pass recomputed them.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// tanh through one `exp` (libm's `tanhf` is several times slower); exact to ~1e-7 absolute,
/// and ±1 without overflow trouble at the extremes (exp → ∞ or 0).
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / ((2.0 * x).exp() + 1.0)
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    super::cpu_f32(s, l, "lstm cell")
}

/// (gates (B, 4H), c_prev (B, H)) → (B, 7H) holding [h | c | i | f | g | o | tanh c].
struct LstmCell;
/// (saved (B, 7H), c_prev, d[h | c] (B, 2H)) → (B, 5H) holding [d gates | d c_prev].
struct LstmCellBackward;

impl CustomOp2 for LstmCell {
    fn name(&self) -> &'static str {
        "wick-lstm-cell"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gates, c_prev) = (slice(s1, l1)?, slice(s2, l2)?);
        let (b, h4) = l1.shape().dims2()?;
        let h = h4 / 4;
        let mut out = vec![0f32; b * 7 * h];
        for r in 0..b {
            let g = &gates[r * h4..(r + 1) * h4];
            let cp = &c_prev[r * h..(r + 1) * h];
            let row = &mut out[r * 7 * h..(r + 1) * 7 * h];
            for j in 0..h {
                let (i, f, gg, o) = (sigmoid(g[j]), sigmoid(g[h + j]), tanh(g[2 * h + j]), sigmoid(g[3 * h + j]));
                let c = f * cp[j] + i * gg;
                let tc = tanh(c);
                for (k, v) in [o * tc, c, i, f, gg, o, tc].into_iter().enumerate() {
                    row[k * h + j] = v;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 7 * h))))
    }

    fn bwd(&self, _gates: &Tensor, c_prev: &Tensor, saved: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = c_prev.dim(1)?;
        // Only h and c are used downstream: the rest of `saved` gets no gradient.
        let grad = grad.narrow(1, 0, 2 * h)?.contiguous()?;
        let d = saved.apply_op3_no_bwd(c_prev, &grad, &LstmCellBackward)?;
        Ok((Some(d.narrow(1, 0, 4 * h)?), Some(d.narrow(1, 4 * h, h)?)))
    }
}

impl CustomOp3 for LstmCellBackward {
    fn name(&self) -> &'static str {
        "wick-lstm-cell-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (saved, c_prev, grad) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (b, h7) = l1.shape().dims2()?;
        let h = h7 / 7;
        let mut out = vec![0f32; b * 5 * h];
        for r in 0..b {
            let sv = &saved[r * h7..(r + 1) * h7];
            let (i, f, gg, o, tc) = (&sv[2 * h..3 * h], &sv[3 * h..4 * h], &sv[4 * h..5 * h], &sv[5 * h..6 * h], &sv[6 * h..7 * h]);
            let cp = &c_prev[r * h..(r + 1) * h];
            let (dh, dc_out) = grad[r * 2 * h..(r + 1) * 2 * h].split_at(h);
            let (dg, dcp) = out[r * 5 * h..(r + 1) * 5 * h].split_at_mut(4 * h);
            for j in 0..h {
                let dc = dc_out[j] + dh[j] * o[j] * (1.0 - tc[j] * tc[j]);
                dg[j] = dc * gg[j] * i[j] * (1.0 - i[j]);
                dg[h + j] = dc * cp[j] * f[j] * (1.0 - f[j]);
                dg[2 * h + j] = dc * i[j] * (1.0 - gg[j] * gg[j]);
                dg[3 * h + j] = dh[j] * tc[j] * o[j] * (1.0 - o[j]);
                dcp[j] = dc * f[j];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 5 * h))))
    }
}

/// The reference formulation with candle ops (every device and dtype); returns (h, c).
pub fn lstm_cell_ops(gates: &Tensor, c_prev: &Tensor) -> Result<(Tensor, Tensor)> {
    let h = c_prev.dim(1)?;
    let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, h)?)?;
    let f = candle_nn::ops::sigmoid(&gates.narrow(1, h, h)?)?;
    let g = gates.narrow(1, 2 * h, h)?.tanh()?;
    let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * h, h)?)?;
    let c = ((f * c_prev)? + (i * g)?)?;
    Ok(((o * c.tanh()?)?, c))
}

/// One LSTM cell step: (h, c) from gate pre-activations (B, 4H) and the previous cell state.
pub fn lstm_cell(gates: &Tensor, c_prev: &Tensor) -> Result<(Tensor, Tensor)> {
    if super::fused_path(gates.device()) && gates.dtype() == DType::F32 && c_prev.dtype() == DType::F32 {
        fused_lstm_cell(gates, c_prev)
    } else {
        lstm_cell_ops(gates, c_prev)
    }
}

/// The fused op itself (f32 CPU tensors), whatever the path: what the tests compare.
fn fused_lstm_cell(gates: &Tensor, c_prev: &Tensor) -> Result<(Tensor, Tensor)> {
    let h = c_prev.dim(1)?;
    let saved = gates.contiguous()?.apply_op2(&c_prev.contiguous()?, LstmCell)?;
    Ok((saved.narrow(1, 0, h)?, saved.narrow(1, h, h)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_cell_matches_the_ops_formulation() -> Result<()> {
        let dev = Device::Cpu;
        let gates = Var::randn(0f32, 2.0, (3, 4 * 5), &dev)?;
        let c_prev = Var::randn(0f32, 1.0, (3, 5), &dev)?;
        let (h1, c1) = fused_lstm_cell(&gates, &c_prev)?;
        let (h2, c2) = lstm_cell_ops(&gates, &c_prev)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(close(&h1, &h2)? < 1e-6 && close(&c1, &c2)? < 1e-6);
        let (ph, pc) = (Tensor::randn(0f32, 1.0, (3, 5), &dev)?, Tensor::randn(0f32, 1.0, (3, 5), &dev)?);
        let g1 = ((h1 * &ph)?.sum_all()? + (c1 * &pc)?.sum_all()?)?.backward()?;
        let g2 = ((h2 * &ph)?.sum_all()? + (c2 * &pc)?.sum_all()?)?.backward()?;
        for v in [&gates, &c_prev] {
            assert!(close(g1.get(v).unwrap(), g2.get(v).unwrap())? < 1e-5);
        }
        Ok(())
    }
}

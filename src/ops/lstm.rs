//! The LSTM cell's elementwise part as one op: from the gate pre-activations (i, f, g, o, in
//! PyTorch's order) and the previous cell state to the new hidden and cell state.
//!
//! Written with candle ops the cell is about a dozen small tensors a time step forwards and twice
//! that backwards; at char-RNN sizes (batch 32, hidden 256) each op costs more in dispatch and
//! allocation than in arithmetic. Here it is one pass forwards and one backwards (CPU, f32);
//! other devices and dtypes use the candle-ops formulation, [`lstm_cell_ops`].

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    super::cpu_f32(s, l, "lstm cell")
}

/// (gates (B, 4H), c_prev (B, H)) → (B, 2H) holding [h | c].
struct LstmCell;
/// (gates, c_prev, d[h | c]) → (B, 5H) holding [d gates | d c_prev].
struct LstmCellBackward;

impl CustomOp2 for LstmCell {
    fn name(&self) -> &'static str {
        "wick-lstm-cell"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gates, c_prev) = (slice(s1, l1)?, slice(s2, l2)?);
        let (b, h4) = l1.shape().dims2()?;
        let h = h4 / 4;
        let mut out = vec![0f32; b * 2 * h];
        for r in 0..b {
            let g = &gates[r * h4..(r + 1) * h4];
            let cp = &c_prev[r * h..(r + 1) * h];
            let (ho, co) = out[r * 2 * h..(r + 1) * 2 * h].split_at_mut(h);
            for j in 0..h {
                let c = sigmoid(g[h + j]) * cp[j] + sigmoid(g[j]) * g[2 * h + j].tanh();
                co[j] = c;
                ho[j] = sigmoid(g[3 * h + j]) * c.tanh();
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 2 * h))))
    }

    fn bwd(&self, gates: &Tensor, c_prev: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = c_prev.dim(1)?;
        let d = gates.apply_op3_no_bwd(c_prev, &grad.contiguous()?, &LstmCellBackward)?;
        Ok((Some(d.narrow(1, 0, 4 * h)?), Some(d.narrow(1, 4 * h, h)?)))
    }
}

impl CustomOp3 for LstmCellBackward {
    fn name(&self) -> &'static str {
        "wick-lstm-cell-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gates, c_prev, grad) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (b, h4) = l1.shape().dims2()?;
        let h = h4 / 4;
        let mut out = vec![0f32; b * 5 * h];
        for r in 0..b {
            let g = &gates[r * h4..(r + 1) * h4];
            let cp = &c_prev[r * h..(r + 1) * h];
            let (dh, dc_out) = grad[r * 2 * h..(r + 1) * 2 * h].split_at(h);
            let (dg, dcp) = out[r * 5 * h..(r + 1) * 5 * h].split_at_mut(4 * h);
            for j in 0..h {
                let (i, f, gg, o) = (sigmoid(g[j]), sigmoid(g[h + j]), g[2 * h + j].tanh(), sigmoid(g[3 * h + j]));
                let tc = (f * cp[j] + i * gg).tanh();
                let dc = dc_out[j] + dh[j] * o * (1.0 - tc * tc);
                dg[j] = dc * gg * i * (1.0 - i);
                dg[h + j] = dc * cp[j] * f * (1.0 - f);
                dg[2 * h + j] = dc * i * (1.0 - gg * gg);
                dg[3 * h + j] = dh[j] * tc * o * (1.0 - o);
                dcp[j] = dc * f;
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
    if gates.device().is_cpu() && gates.dtype() == DType::F32 && c_prev.dtype() == DType::F32 {
        let h = c_prev.dim(1)?;
        let hc = gates.contiguous()?.apply_op2(&c_prev.contiguous()?, LstmCell)?;
        Ok((hc.narrow(1, 0, h)?, hc.narrow(1, h, h)?))
    } else {
        lstm_cell_ops(gates, c_prev)
    }
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
        let (h1, c1) = lstm_cell(&gates, &c_prev)?;
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

//! Every kernel level the CPU has × every weight dtype × both layouts against an f64 reference,
//! on shapes that are not multiples of the vector width; the op's gradients against candle's.

use super::*;
use candle_core::{Device, Var};

pub(super) use crate::ops::test_values as values;

/// The quantized kernels' check against a reference level's sums: the same integers, scaled and
/// summed in another order, so equal to 1e-5 relative (absolute below 1). `what` names the case.
pub(super) fn assert_same_sums(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what} [{i}]: {g} vs {w}");
    }
}

/// The weight in `dtype` (as the kernels read it) and its exact values as f32.
fn weight(vals: &[f32], dtype: DType) -> Result<(CpuStorage, Vec<f32>)> {
    let t = Tensor::from_slice(vals, vals.len(), &Device::Cpu)?.to_dtype(dtype)?;
    let exact = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let (s, _) = t.storage_and_layout();
    let storage = match &*s {
        candle_core::Storage::Cpu(c) => c.clone(),
        _ => unreachable!(),
    };
    Ok((storage, exact))
}

use crate::cpu::available_levels as levels;

#[test]
fn every_level_dtype_and_layout_matches_f64() -> Result<()> {
    // The last two: rows of W too wide for 4 in one block of a single row of x (1 row of 1700
    // columns a block; 2 of 1100 in f16/bf16, with one left over: `kernels::block_rows`).
    let shapes = [(1, 1), (7, 13), (37, 53), (70, 131), (129, 300), (16, 64), (19, 1700), (9, 1100)];
    let rows = [1, 2, 3, 4, 5, 8, 9, 20];
    for (si, &(k, n)) in shapes.iter().enumerate() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (storage, w) = weight(&values(k * n, si as u64 + 1), dtype)?;
            let layout = Layout::contiguous(k * n);
            let data = weight_data(&storage, &layout)?;
            for wl in [WeightLayout::InOut, WeightLayout::OutIn] {
                // Element (i, j) of the (k, n) right operand.
                let at = |i: usize, j: usize| match wl {
                    WeightLayout::InOut => w[i * n + j] as f64,
                    WeightLayout::OutIn => w[j * k + i] as f64,
                };
                for &m in &rows {
                    let x = values(m * k, 100 + m as u64);
                    let bias = values(n, 7);
                    for isa in levels() {
                        for tasks in [1, 3] {
                            let mut y: Vec<f32> = bias.repeat(m);
                            product(isa, &x, data, Problem { m, k, n, layout: wl }, &mut y, tasks)?;
                            for r in 0..m {
                                for j in 0..n {
                                    let (mut exact, mut scale) = (bias[j] as f64, bias[j].abs() as f64);
                                    for i in 0..k {
                                        exact += x[r * k + i] as f64 * at(i, j);
                                        scale += (x[r * k + i] as f64 * at(i, j)).abs();
                                    }
                                    let err = (y[r * n + j] as f64 - exact).abs();
                                    assert!(
                                        err <= 1e-6 * (k as f64).sqrt() * scale + 1e-7,
                                        "{isa:?} {dtype:?} {wl:?} m {m} k {k} n {n} tasks {tasks}: y[{r}][{j}] = {} vs {exact}",
                                        y[r * n + j]
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn bad_levels_and_sizes_are_errors() -> Result<()> {
    let (storage, _) = weight(&values(12, 1), DType::F16)?;
    let data = weight_data(&storage, &Layout::contiguous(12))?;
    let mut y = vec![0f32; 4];
    let p = Problem { m: 1, k: 3, n: 4, layout: WeightLayout::InOut };
    assert!(product(Isa::Portable, &[1.0; 3], data, p, &mut y, 1).is_ok());
    assert!(product(Isa::Portable, &[1.0; 2], data, p, &mut y, 1).is_err());
    if crate::cpu::detected_isa() < Isa::Avx512 {
        assert!(product(Isa::Avx512, &[1.0; 3], data, p, &mut y, 1).is_err());
    }
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 5), DType::F32, &dev)?;
    let w = Tensor::zeros((4, 3), DType::BF16, &dev)?;
    assert!(fused_matmul_weight(&x, &w, None, WeightLayout::InOut).is_err());
    let b = Tensor::zeros(5, DType::F32, &dev)?;
    let w = Tensor::zeros((5, 3), DType::BF16, &dev)?;
    assert!(fused_matmul_weight(&x, &w, Some(&b), WeightLayout::InOut).is_err());
    assert_eq!(fused_matmul_weight(&x, &w, None, WeightLayout::InOut)?.dims(), [2, 3]);
    Ok(())
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar()
}

#[test]
fn the_op_matches_plain_ops_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    // 2×3 rows: our kernels; 4×5 rows: the gemm path.
    for lead in [(2, 3), (4, 5)] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let (k, n) = (19, 37);
                let shape = if layout == WeightLayout::InOut { (k, n) } else { (n, k) };
                let x = Var::from_tensor(&Tensor::randn(0f32, 1., (lead.0, lead.1, k), &dev)?)?;
                let w = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dtype)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f32, 1., n, &dev)?.to_dtype(dtype)?)?;
                let probe = Tensor::randn(0f32, 1., (lead.0, lead.1, n), &dev)?;
                let ours = fused_matmul_weight(&x, &w, Some(&b), layout)?;
                let plain = reference_matmul_weight(&x, &w, Some(&b), layout)?;
                assert_eq!(ours.dims(), plain.dims());
                assert!(max_diff(&ours, &plain)? < 1e-4, "{dtype:?} {layout:?} forward");
                let go = (ours * &probe)?.sum_all()?.backward()?;
                let gp = (plain * &probe)?.sum_all()?.backward()?;
                // dW and db come back in the weight's dtype: compare at its precision.
                let tol = if dtype == DType::F32 { 1e-4 } else { 0.05 };
                for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                    let (a, r) = (go.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap());
                    assert_eq!(a.dtype(), v.dtype());
                    let scale = r.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                    assert!(max_diff(a, r)? < tol * scale, "{dtype:?} {layout:?} {lead:?} d{name}");
                }
                // Without a bias.
                let ours = fused_matmul_weight(&x, &w, None, layout)?;
                assert!(max_diff(&ours, &reference_matmul_weight(&x, &w, None, layout)?)? < 1e-4);
            }
        }
    }
    Ok(())
}

#[test]
fn f16_bits_convert_exactly() -> Result<()> {
    // Every half but the NaNs: ours → f32 → candle's f16 gives the same bits, and candle's f16 →
    // f32 the same value (so our value is exact).
    let bits: Vec<u16> = (0..=u16::MAX).filter(|b| (b >> 10) & 0x1f != 0x1f || b & 0x3ff == 0).collect();
    let ours: Vec<f32> = bits.iter().map(|&b| f16_to_f32(b)).collect();
    let (storage, candle_values) = weight(&ours, DType::F16)?;
    let WeightData::F16(candle_bits) = weight_data(&storage, &Layout::contiguous(ours.len()))? else { unreachable!() };
    assert!(candle_bits == bits && candle_values == ours);
    assert_eq!((f16_to_f32(0x3c00), f16_to_f32(0xc000), f16_to_f32(0x0001)), (1.0, -2.0, 2f32.powi(-24)));
    assert!(f16_to_f32(0x7e00).is_nan());
    Ok(())
}

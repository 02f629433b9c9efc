//! The fused layer against the per-step candle-ops formulation: outputs and every gradient, at
//! every instruction-set level this CPU has and several row-block (thread) splits.

use super::*;
use candle_core::{Device, Var};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
}

struct Params {
    w_ih: Var,
    w_hh: Var,
    b_ih: Var,
    b_hh: Var,
}

impl Params {
    fn new(input: usize, hidden: usize, dev: &Device) -> Result<Self> {
        let v = |shape: &[usize]| Var::randn(0f32, 0.5, shape, dev);
        Ok(Self { w_ih: v(&[4 * hidden, input])?, w_hh: v(&[4 * hidden, hidden])?, b_ih: v(&[4 * hidden])?, b_hh: v(&[4 * hidden])? })
    }

    fn weights(&self) -> LstmWeights<'_> {
        LstmWeights { w_ih: self.w_ih.as_tensor(), w_hh: self.w_hh.as_tensor(), b_ih: self.b_ih.as_tensor(), b_hh: self.b_hh.as_tensor() }
    }
}

type Layer<'a> = &'a dyn Fn(&Tensor, LstmWeights, Option<&Tensor>, Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)>;

/// `layers` stacked layers on x (b, t, i) with hidden size h, from random initial states or
/// none: the fused op (every level, several thread counts) against the candle-ops reference.
fn check(b: usize, t: usize, i: usize, h: usize, layers: usize, with_state: bool) -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (b, t, i), &dev)?;
    let params = (0..layers).map(|k| Params::new(if k == 0 { i } else { h }, h, &dev)).collect::<Result<Vec<_>>>()?;
    let states = if with_state {
        (0..layers).map(|_| Ok((Var::randn(0f32, 1.0, (b, h), &dev)?, Var::randn(0f32, 1.0, (b, h), &dev)?))).collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    // A loss that weighs every output (all h, final h, final c) of every layer differently.
    let probes = (0..layers)
        .map(|_| Ok([Tensor::randn(0f32, 1.0, (b, t, h), &dev)?, Tensor::randn(0f32, 1.0, (b, h), &dev)?, Tensor::randn(0f32, 1.0, (b, h), &dev)?]))
        .collect::<Result<Vec<_>>>()?;
    let run = |layer: Layer| -> Result<(Vec<Tensor>, Tensor)> {
        let (mut input, mut outputs) = (x.as_tensor().clone(), Vec::new());
        let mut loss = Tensor::zeros((), DType::F32, &dev)?;
        for (k, p) in params.iter().enumerate() {
            let (h0, c0) = states.get(k).map_or((None, None), |(h0, c0)| (Some(h0.as_tensor()), Some(c0.as_tensor())));
            let (hs, h_last, c_last) = layer(&input, p.weights(), h0, c0)?;
            for (out, probe) in [&hs, &h_last, &c_last].into_iter().zip(&probes[k]) {
                loss = (loss + (out * probe)?.sum_all()?)?;
            }
            outputs.extend([hs.clone(), h_last, c_last]);
            input = hs;
        }
        Ok((outputs, loss))
    };
    let (expected, loss) = run(&|x, w, h0, c0| lstm_layer_ops(x, w, h0, c0))?;
    let expected_grads = loss.backward()?;
    let mut vars = vec![&x];
    for p in &params {
        vars.extend([&p.w_ih, &p.w_hh, &p.b_ih, &p.b_hh]);
    }
    for (h0, c0) in &states {
        vars.extend([h0, c0]);
    }
    for isa in crate::cpu::available_levels() {
        for threads in [1, 2, 3, 5] {
            let kernel = Kernel { isa, threads };
            let (outputs, loss) = run(&|x, w, h0, c0| fused_lstm_layer(x, w, h0, c0, kernel))?;
            for (k, (a, e)) in outputs.iter().zip(&expected).enumerate() {
                assert!(max_diff(a, e)? < 1e-5, "{kernel:?}: output {k} of layers × (hs, h, c)");
            }
            let grads = loss.backward()?;
            for (k, v) in vars.iter().enumerate() {
                let (a, e) = (grads.get(v.as_tensor()).expect("fused gradient"), expected_grads.get(v.as_tensor()).expect("reference gradient"));
                assert!(max_diff(a, e)? < 1e-4, "{kernel:?}: gradient of input {k} {:?}", v.dims());
            }
        }
    }
    Ok(())
}

#[test]
fn one_layer_from_zeros_matches_the_ops_formulation() -> Result<()> {
    check(3, 5, 7, 6, 1, false)
}

#[test]
fn one_layer_from_a_given_state_matches_the_ops_formulation() -> Result<()> {
    check(3, 5, 7, 6, 1, true)
}

#[test]
fn two_layers_match_the_ops_formulation() -> Result<()> {
    check(3, 5, 7, 6, 2, true)?;
    check(4, 1, 3, 9, 2, false)
}

#[test]
fn an_input_without_gradient_gets_none_and_the_weights_still_do() -> Result<()> {
    let dev = Device::Cpu;
    let p = Params::new(4, 5, &dev)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?;
    let kernel = Kernel { isa: Isa::Portable, threads: 2 };
    let (hs, _, _) = fused_lstm_layer(&x, p.weights(), None, None, kernel)?;
    let grads = hs.sum_all()?.backward()?;
    let (hs_ref, _, _) = lstm_layer_ops(&x, p.weights(), None, None)?;
    let grads_ref = hs_ref.sum_all()?.backward()?;
    assert!(grads.get(&x).is_none());
    for v in [&p.w_ih, &p.w_hh, &p.b_ih, &p.b_hh] {
        assert!(max_diff(grads.get(v.as_tensor()).unwrap(), grads_ref.get(v.as_tensor()).unwrap())? < 1e-4);
    }
    Ok(())
}

#[test]
fn shapes_that_do_not_fit_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let p = Params::new(4, 5, &dev)?;
    let bad_x = Tensor::zeros((2, 3, 6), DType::F32, &dev)?;
    assert!(lstm_layer(&bad_x, p.weights(), None, None).is_err());
    let x = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
    let bad_h0 = Tensor::zeros((3, 5), DType::F32, &dev)?;
    assert!(lstm_layer(&x, p.weights(), Some(&bad_h0), None).is_err());
    let no_steps = Tensor::zeros((2, 0, 4), DType::F32, &dev)?;
    assert!(lstm_layer(&no_steps, p.weights(), None, None).is_err());
    assert!(lstm_layer(&x, p.weights(), None, None).is_ok());
    Ok(())
}

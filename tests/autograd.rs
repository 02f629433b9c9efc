//! candle's backward pass as wick builds it (vendor/candle-core: the first contribution to a
//! gradient is stored as it is, not added to zeros): the cases that change touches, against
//! gradients derived by hand.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn gradients_of_the_patched_cases_are_the_hand_derived_ones() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_slice(&[1f32, -2.0, 3.0, 0.5, 4.0, -1.5], (2, 3), &dev)?;
    let b = Var::from_slice(&[0.25f32, -1.0, 2.0], 3, &dev)?;
    let c = Tensor::from_slice(&[2f32, 3.0, -1.0, 1.0, 0.5, 2.0], (2, 3), &dev)?;
    // x has four consumers (x·x twice through mul, x·c, and c − x through sub); b is broadcast
    // over the rows; the sum's gradient (ones) is shared by both arguments of each add.
    let y = ((x.mul(&x)? + x.mul(&c)?)? + c.sub(&x)?)?.broadcast_add(&b)?;
    let grads = y.sum_all()?.backward()?;
    let gx = values(grads.get(&x).unwrap())?;
    let want: Vec<f32> = values(&x)?.iter().zip(values(&c)?).map(|(x, c)| 2.0 * x + c - 1.0).collect();
    assert_eq!(gx, want, "d/dx (x² + c·x + c − x) = 2x + c − 1");
    assert_eq!(values(grads.get(&b).unwrap())?, vec![2.0; 3], "b is added to both rows");

    // A variable read through views: narrow (an offset into its storage) and a transpose.
    let w = Var::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), &dev)?;
    let y = (w.narrow(1, 1, 2)?.sum_all()? * 3.0)?;
    let g = grads_of(&y, &w)?;
    assert_eq!(g, vec![0.0, 3.0, 3.0, 0.0, 3.0, 3.0]);
    let probe = Tensor::from_slice(&[1f32, 10.0, 100.0, 1000.0, 1e4, 1e5], (3, 2), &dev)?;
    let g = grads_of(&w.t()?.mul(&probe)?.sum_all()?, &w)?;
    assert_eq!(g, vec![1.0, 100.0, 1e4, 10.0, 1000.0, 1e5], "the transpose's gradient, stored in w's own layout");

    // Views that a concatenation's backward pass gives its arguments: at an offset (copied out of
    // the gradient of the whole) and at the start.
    let g = grads_of(&Tensor::cat(&[&c, w.as_tensor()], 0)?.mul(&Tensor::cat(&[&c, &c], 0)?)?.sum_all()?, &w)?;
    assert_eq!(g, values(&c)?);
    let g = grads_of(&Tensor::cat(&[w.as_tensor(), &c], 0)?.sum_all()?, &w)?;
    assert_eq!(g, vec![1.0; 6]);

    // Only a subtraction reaches a variable: its gradient is −1, not 0 − 1 in another form.
    let g = grads_of(&c.sub(&w)?.sum_all()?, &w)?;
    assert_eq!(g, vec![-1.0; 6]);
    Ok(())
}

fn grads_of(y: &Tensor, v: &Var) -> Result<Vec<f32>> {
    let grads = y.backward()?;
    let g = grads.get(v).expect("a gradient for the variable");
    assert!(g.is_contiguous() && g.layout().start_offset() == 0, "stored contiguous, from its own start");
    values(g)
}

/// A custom op whose backward pass returns a gradient of the wrong shape is an error, as it was
/// when candle added every first gradient to zeros of the argument's shape.
#[test]
fn a_gradient_of_the_wrong_shape_is_an_error() -> Result<()> {
    struct WrongGradient;
    impl candle_core::CustomOp1 for WrongGradient {
        fn name(&self) -> &'static str {
            "wrong-gradient"
        }
        fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            Ok((s.clone(), l.shape().clone()))
        }
        fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(grad.flatten_all()?))
        }
    }
    let w = Var::from_slice(&[1f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu)?;
    let err = w.apply_op1(WrongGradient)?.sum_all()?.backward().expect_err("a (4,) gradient for a (2, 2) variable");
    assert!(err.to_string().contains("shape mismatch"), "{err}");
    Ok(())
}

//! Optimizers, gradient clipping and LR schedules against PyTorch / transformers
//! (reference values from tests/fixtures/make_fixtures.py).

mod common;

use anyhow::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, Linear, VarMap};
use common::{assert_close, Fixture};
use wick::train::optim::{self, clip_grad_norm, grads_of, OptimizerConfig};
use wick::train::Schedule;

/// The classic PyTorch example: 10 → 20 → 1 with ReLU, trained with MSE.
struct Net {
    fc1: Linear,
    fc2: Linear,
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
}

/// Five full-batch steps of `config` from the fixture's initial weights; compares the loss
/// before each step and the final weights with PyTorch's.
fn run(key: &str, config: OptimizerConfig, lr: f64, no_decay: fn(&str) -> bool, clip: Option<f64>) -> Result<()> {
    let fx = Fixture::load("optim_net")?;
    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &fx.device, 0);
    let net = Net { fc1: linear(10, 20, vb.pp("fc1"))?, fc2: linear(20, 1, vb.pp("fc2"))? };
    fx.load_into(&varmap)?;
    let mut opt = config.build(optim::params(&varmap, no_decay))?;
    let (x, y) = (fx.get("input.x")?, fx.get("input.y")?);
    let mut losses = vec![];
    let mut norms = vec![];
    for _ in 0..5 {
        let loss = candle_nn::loss::mse(&net.forward(&x)?, &y)?;
        losses.push(loss.to_scalar::<f32>()?);
        let mut grads = grads_of(opt.params(), &loss.backward()?);
        norms.push(clip_grad_norm(&mut grads, clip)? as f32);
        opt.step(&grads, lr)?;
    }
    let n = losses.len();
    assert_close(&format!("{key} losses"), &Tensor::from_vec(losses, n, &fx.device)?, &fx.get(&format!("output.{key}.losses"))?, 1e-5)?;
    if clip.is_some() {
        assert_close("clip norms", &Tensor::from_vec(norms, n, &fx.device)?, &fx.get("output.clip.grad_norms")?, 1e-5)?;
    }
    for p in opt.params() {
        assert_close(&format!("{key} final {}", p.name), p.var.as_tensor(), &fx.get(&format!("output.{key}.final.{}", p.name))?, 1e-5)?;
    }
    Ok(())
}

fn decay_all(_: &str) -> bool {
    false
}

fn bias(name: &str) -> bool {
    name.ends_with("bias")
}

fn all_cases() -> Result<()> {
    run("sgd", OptimizerConfig::sgd(), 0.01, decay_all, None)?;
    run("sgd_momentum", OptimizerConfig::Sgd { momentum: 0.9, weight_decay: 0.01 }, 0.01, decay_all, None)?;
    run("adam", OptimizerConfig::adam(), 0.01, decay_all, None)?;
    run("adamw", OptimizerConfig::adamw(0.1), 0.01, decay_all, None)?;
    run("adamw_nodecay_bias", OptimizerConfig::adamw(0.1), 0.01, bias, None)?;
    run("clip", OptimizerConfig::sgd(), 0.1, decay_all, Some(0.5))
}

/// The in-place CPU updates; `.ci/run` runs this again with `WICK_OPS=reference`, which checks
/// the candle-ops updates other devices take.
#[test]
fn optimizers_match_pytorch() -> Result<()> {
    all_cases()
}

#[test]
fn optimizer_state_round_trips() -> Result<()> {
    let device = wick::device::test_device()?;
    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &device, 3);
    let net = Net { fc1: linear(10, 20, vb.pp("fc1"))?, fc2: linear(20, 1, vb.pp("fc2"))? };
    let x = Tensor::randn(0f32, 1.0, (8, 10), &device)?;
    let mut opt = OptimizerConfig::adamw(0.1).build(optim::params(&varmap, bias))?;
    let grads = grads_of(opt.params(), &net.forward(&x)?.sum_all()?.backward()?);
    opt.step(&grads, 1e-2)?;
    let state: std::collections::HashMap<String, Tensor> = opt.state()?.into_iter().collect();
    let mut fresh = OptimizerConfig::adamw(0.1).build(optim::params(&varmap, bias))?;
    fresh.load_state(&state)?;
    let again: std::collections::HashMap<String, Tensor> = fresh.state()?.into_iter().collect();
    for (k, v) in &state {
        assert_close(k, &again[k], v, 0.0)?;
    }
    // A state for other shapes is refused with the tensor's name.
    let mut bad = state.clone();
    bad.insert("exp_avg.fc1.weight".into(), Tensor::zeros((3, 3), DType::F32, &device)?);
    let err = fresh.load_state(&bad).unwrap_err().to_string();
    assert!(err.contains("exp_avg.fc1.weight"), "{err}");
    Ok(())
}

#[test]
fn schedules_match_transformers() -> Result<()> {
    let text = std::fs::read_to_string(common::fixture_path("schedules.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let (warmup, total) = (v["warmup_steps"].as_u64().unwrap() as usize, v["total_steps"].as_u64().unwrap() as usize);
    let cases = [
        ("constant", Schedule::Constant),
        ("constant_warmup", Schedule::ConstantWithWarmup { warmup }),
        ("linear_warmup", Schedule::LinearWarmup { warmup }),
        ("cosine_warmup", Schedule::CosineWarmup { warmup, min_ratio: 0.0 }),
    ];
    for (key, schedule) in cases {
        let expected = v[key].as_array().unwrap();
        assert_eq!(expected.len(), total + 1);
        for (step, e) in expected.iter().enumerate() {
            let (ours, theirs) = (schedule.factor(step, total), e.as_f64().unwrap());
            assert!((ours - theirs).abs() < 1e-9, "{key} step {step}: {ours} vs {theirs}");
        }
    }
    assert_eq!(Schedule::warmup_steps(0.06, 1000), 60);
    assert!(Schedule::parse("exp", 0).is_err());
    Ok(())
}

#[test]
fn half_precision_parameters_keep_f32_state_and_stay_finite() -> Result<()> {
    // In f16, eps = 1e-8 and (1e-4)² round to zero: state kept in f16 would divide 0 by 0.
    let device = wick::device::test_device()?;
    let var = candle_core::Var::ones(4, DType::F16, &device)?;
    let params = vec![optim::Param { name: "w".into(), var: var.clone(), decay: true }];
    let mut opt = OptimizerConfig::adamw(0.01).build(params)?;
    let g = Tensor::new(&[0f32, 1e-4, 1.0, -1.0], &device)?.to_dtype(DType::F16)?;
    for _ in 0..3 {
        opt.step(&[Some(g.clone())], 1e-2)?;
    }
    let w = var.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    assert!(w.iter().all(|v| v.is_finite()), "{w:?}");
    assert!((w[2] - (1.0 - 0.03)).abs() < 2e-3 && (w[3] - (1.0 + 0.03)).abs() < 2e-3, "{w:?}");
    assert!(opt.state()?.iter().all(|(_, t)| t.dtype() == DType::F32 || t.dtype() == DType::F64));
    Ok(())
}

#[test]
fn rnn_biases_get_no_weight_decay() -> Result<()> {
    use wick::models::rnn::{CharRnn, CharRnnConfig, Cell};
    for cell in [Cell::Lstm, Cell::Gru] {
        let varmap = VarMap::new();
        let vb = wick::nn::var_builder(&varmap, DType::F32, &candle_core::Device::Cpu, 0);
        CharRnn::load(vb, &CharRnnConfig::new(cell, 11, 4, 6, 2))?;
        let params = optim::params(&varmap, optim::is_bias_or_norm);
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        for layer in ["l0", "l1"] {
            for name in [format!("rnn.bias_ih_{layer}"), format!("rnn.bias_hh_{layer}"), format!("rnn.weight_ih_{layer}")] {
                assert!(names.contains(&name.as_str()), "{cell:?}: no {name} in {names:?}");
            }
        }
        for p in &params {
            let last = p.name.rsplit('.').next().unwrap();
            assert_eq!(p.decay, !last.starts_with("bias"), "{cell:?}: {} decay {}", p.name, p.decay);
        }
    }
    Ok(())
}

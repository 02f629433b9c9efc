//! wick's models against PyTorch on the same weights and inputs: outputs, losses and the
//! gradient of every parameter (reference values from tests/fixtures/make_fixtures.py).

mod common;

use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::{ModuleT, VarMap};
use common::{assert_close, Fixture};
use wick::models::cnn::{ConvNet, ConvNetConfig, LeNet5, LeNetConfig};
use wick::models::mlp::{Mlp, MlpConfig};
use wick::models::rnn::{Cell, CharRnn, CharRnnConfig, Rnn, RnnClassifier, RnnConfig};
use wick::nn::cross_entropy;

const TOL: f64 = 1e-5;

fn builder(varmap: &VarMap, fx: &Fixture) -> candle_nn::VarBuilder<'static> {
    wick::nn::var_builder(varmap, DType::F32, &fx.device, 0)
}

/// Forward in training mode, the loss, and the gradients, all against the fixture.
fn check_classifier(fx: &Fixture, varmap: &VarMap, net: &dyn ModuleT, x: &str, y: &str) -> Result<()> {
    fx.load_into(varmap)?;
    let logits = net.forward_t(&fx.get(x)?, true)?;
    assert_close("logits", &logits, &fx.get("output.logits")?, TOL)?;
    let loss = cross_entropy(&logits, &fx.get(y)?)?;
    assert_close("loss", &loss, &fx.get("output.loss")?, TOL)?;
    fx.check_grads(varmap, &loss, 1e-4)
}

#[test]
fn mlp_matches_pytorch() -> Result<()> {
    let fx = Fixture::load("mlp")?;
    let varmap = VarMap::new();
    let net = Mlp::load(builder(&varmap, &fx), &MlpConfig::new(5, &[7, 6], 3))?;
    check_classifier(&fx, &varmap, &net, "input.x", "input.y")
}

#[test]
fn lenet_matches_pytorch() -> Result<()> {
    let fx = Fixture::load("lenet")?;
    let varmap = VarMap::new();
    let net = LeNet5::load(builder(&varmap, &fx), &LeNetConfig::default())?;
    check_classifier(&fx, &varmap, &net, "input.x", "input.y")
}

#[test]
fn convnet_with_batch_norm_matches_pytorch_in_eval_and_train_mode() -> Result<()> {
    let fx = Fixture::load("convnet")?;
    let varmap = VarMap::new();
    let cfg = ConvNetConfig { in_channels: 1, image_size: 12, channels: vec![4, 8], kernel_size: 3, batch_norm: true, hidden: None, dropout: 0.0, num_classes: 5 };
    let net = ConvNet::load(builder(&varmap, &fx), &cfg)?;
    fx.load_into(&varmap)?;
    let eval_logits = net.forward_t(&fx.get("input.x")?, false)?;
    assert_close("eval logits (running statistics)", &eval_logits, &fx.get("output.logits_eval")?, TOL)?;
    check_classifier(&fx, &varmap, &net, "input.x", "input.y")?;
    // The running statistics moved as PyTorch's did (momentum 0.1, unbiased variance) — once,
    // by the training-mode forward inside check_classifier.
    let vars = varmap.data().lock().unwrap().clone();
    for i in 0..2 {
        for stat in ["running_mean", "running_var"] {
            let ours = vars[&format!("blocks.{i}.bn.{stat}")].as_tensor().clone();
            assert_close(&format!("{stat} {i}"), &ours, &fx.get(&format!("output.{stat}.{i}"))?, TOL)?;
        }
    }
    Ok(())
}

fn rnn_config(cell: Cell, layers: usize) -> RnnConfig {
    RnnConfig { cell, input_size: 6, hidden_size: 8, num_layers: layers, dropout: 0.0 }
}

fn check_char_lm(name: &str, cell: Cell) -> Result<()> {
    let fx = Fixture::load(name)?;
    let varmap = VarMap::new();
    let cfg = CharRnnConfig { rnn: rnn_config(cell, 2), ..CharRnnConfig::new(cell, 11, 6, 8, 2) };
    let net = CharRnn::load(builder(&varmap, &fx), &cfg)?;
    fx.load_into(&varmap)?;
    let (logits, state) = net.forward_with_state(&fx.get("input.ids")?, None, true)?;
    assert_close("h_n", &state.h, &fx.get("output.h_n")?, TOL)?;
    if cell == Cell::Lstm {
        assert_close("c_n", state.c.as_ref().unwrap(), &fx.get("output.c_n")?, TOL)?;
    }
    assert_close("logits", &logits, &fx.get("output.logits")?, TOL)?;
    let loss = cross_entropy(&logits, &fx.get("input.targets")?)?;
    assert_close("loss", &loss, &fx.get("output.loss")?, TOL)?;
    fx.check_grads(&varmap, &loss, 1e-4)
}

#[test]
fn lstm_language_model_matches_pytorch() -> Result<()> {
    check_char_lm("lstm_lm", Cell::Lstm)
}

#[test]
fn gru_language_model_matches_pytorch() -> Result<()> {
    check_char_lm("gru_lm", Cell::Gru)
}

fn check_rnn_classifier(name: &str, cell: Cell) -> Result<()> {
    let fx = Fixture::load(name)?;
    let varmap = VarMap::new();
    let net = RnnClassifier::load(builder(&varmap, &fx), 11, &rnn_config(cell, 1), 3)?;
    check_classifier(&fx, &varmap, &net, "input.ids", "input.y")
}

#[test]
fn lstm_classifier_matches_pytorch() -> Result<()> {
    check_rnn_classifier("lstm_cls", Cell::Lstm)
}

#[test]
fn gru_classifier_matches_pytorch() -> Result<()> {
    check_rnn_classifier("gru_cls", Cell::Gru)
}

#[test]
fn carried_state_equals_one_long_sequence() -> Result<()> {
    // Running a sequence in two halves with the state carried over gives the same outputs.
    let device = wick::device::test_device()?;
    let varmap = VarMap::new();
    for cell in [Cell::Lstm, Cell::Gru] {
        let rnn = Rnn::load(wick::nn::var_builder(&varmap, DType::F32, &device, 1).pp(format!("{cell:?}")), &rnn_config(cell, 2))?;
        let x = Tensor::randn(0f32, 1.0, (2, 7, 6), &device)?;
        let (full, _) = rnn.forward(&x, None, false)?;
        let (a, state) = rnn.forward(&x.narrow(1, 0, 3)?, None, false)?;
        let (b, _) = rnn.forward(&x.narrow(1, 3, 4)?, Some(&state), false)?;
        assert_close("split sequence", &Tensor::cat(&[a, b], 1)?, &full, 1e-6)?;
    }
    Ok(())
}

/// `.ci/run` runs this file again with `WICK_OPS=reference`: this test makes sure that run
/// really took the plain-candle path (the one CUDA runs), not only that the switch parsed.
#[test]
fn wick_ops_selects_the_path_the_ops_take() -> Result<()> {
    use candle_core::{Device, Var};
    use wick::ops::linear::{linear_relu, WeightLayout};
    use wick::ops::OpsPath;
    let path = OpsPath::from_env()?;
    assert_eq!(OpsPath::current(), path);
    assert_eq!(wick::ops::fused_path(&Device::Cpu), path == OpsPath::Fused);
    // The two formulations differ observably at ReLU's kink: the fused linear op passes no
    // gradient where the output is exactly 0 (PyTorch's rule), candle's relu passes all of it.
    let (x, w, b) = (Var::new(&[[0f32]], &Device::Cpu)?, Var::new(&[[1f32]], &Device::Cpu)?, Var::new(&[0f32], &Device::Cpu)?);
    let grads = linear_relu(&x, &w, Some(&b), WeightLayout::OutIn)?.sum_all()?.backward()?;
    let dx = grads.get(&x).expect("x is a variable").to_vec2::<f32>()?[0][0];
    assert_eq!(dx, if path == OpsPath::Fused { 0.0 } else { 1.0 }, "{path:?}");
    Ok(())
}

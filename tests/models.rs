//! Shapes and dtypes of every model, and the two small networks the project grew from.

use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::{ModuleT, VarMap};
use wick::data::TensorDataset;
use wick::models::cnn::{ConvNet, ConvNetConfig, LeNet5, LeNetConfig};
use wick::models::mlp::{Mlp, MlpConfig};
use wick::models::rnn::{Cell, CharRnn, CharRnnConfig, RnnClassifier, RnnConfig};
use wick::train::tasks::{Classifier, Regressor};
use wick::train::{optim, OptimizerConfig, Trainer, TrainerConfig};

fn check(net: &dyn ModuleT, input: &Tensor, expected: &[usize], dtype: DType) -> Result<()> {
    for train in [false, true] {
        let out = net.forward_t(input, train)?;
        assert_eq!(out.dims(), expected);
        assert_eq!(out.dtype(), dtype);
        let finite = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
        assert!(finite, "non-finite output in {dtype:?}");
    }
    Ok(())
}

#[test]
fn every_model_runs_in_f32_f16_and_bf16() -> Result<()> {
    let device = wick::device::test_device()?;
    // candle's CPU matmul has no bf16 kernel: bf16 is a CUDA dtype.
    let dtypes = if device.is_cpu() { vec![DType::F32, DType::F16] } else { vec![DType::F32, DType::F16, DType::BF16] };
    for dtype in dtypes {
        let varmap = VarMap::new();
        let vb = wick::nn::var_builder(&varmap, dtype, &device, 0);
        let images = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &device)?.to_dtype(dtype)?;
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 7, 0]], &device)?;
        let mlp = Mlp::load(vb.pp("mlp"), &MlpConfig { dropout: 0.1, ..MlpConfig::new(784, &[32], 10) })?;
        check(&mlp, &images, &[3, 10], dtype)?;
        check(&LeNet5::load(vb.pp("lenet"), &LeNetConfig::default())?, &images, &[3, 10], dtype)?;
        check(&ConvNet::load(vb.pp("cnn"), &ConvNetConfig { channels: vec![4, 8], hidden: Some(16), ..Default::default() })?, &images, &[3, 10], dtype)?;
        for cell in [Cell::Lstm, Cell::Gru] {
            let lm = CharRnn::load(vb.pp(format!("lm_{cell:?}")), &CharRnnConfig::new(cell, 8, 5, 6, 2))?;
            check(&lm, &ids, &[2, 4, 8], dtype)?;
            let rnn = RnnConfig { cell, input_size: 5, hidden_size: 6, num_layers: 1, dropout: 0.0 };
            check(&RnnClassifier::load(vb.pp(format!("cls_{cell:?}")), 8, &rnn, 3)?, &ids, &[2, 3], dtype)?;
        }
    }
    Ok(())
}

#[test]
fn bad_configs_are_errors() -> Result<()> {
    let device = wick::device::test_device()?;
    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &device, 0);
    assert!(LeNet5::load(vb.pp("a"), &LeNetConfig { image_size: 8, ..Default::default() }).is_err());
    assert!(ConvNet::load(vb.pp("b"), &ConvNetConfig { channels: vec![2; 6], ..Default::default() }).is_err());
    assert!(ConvNet::load(vb.pp("c"), &ConvNetConfig { kernel_size: 4, ..Default::default() }).is_err());
    let mlp = Mlp::load(vb.pp("d"), &MlpConfig::new(4, &[3], 2))?;
    assert!(mlp.forward_t(&Tensor::zeros((2, 5), DType::F32, &device)?, false).is_err());
    assert!("swish2".parse::<wick::models::Activation>().is_err());
    Ok(())
}

/// CharRnn is a `CausalLm`: batched generation (left-padded prompts) gives each row the tokens
/// it gets alone, and sampling with top-k, top-p and a repetition penalty streams text that adds
/// up to the decoding of the new ids.
#[test]
fn char_rnn_generates_through_causal_lm() -> Result<()> {
    use wick::generate::{generate, GenerationConfig};
    let device = wick::device::test_device()?;
    let corpus = wick::data::chars::CharCorpus::from_text("hello world, héllo wörld; naïve café");
    for cell in [Cell::Lstm, Cell::Gru] {
        let varmap = VarMap::new();
        let net = CharRnn::load(wick::nn::var_builder(&varmap, DType::F32, &device, 5), &CharRnnConfig::new(cell, corpus.vocab.len(), 8, 16, 2))?;
        let prompts = vec![corpus.encode("hel")?, corpus.encode("w")?, corpus.encode("héllo w")?];
        let greedy = GenerationConfig::greedy(12);
        let batched = generate(&net, &prompts, &greedy, None, None)?;
        for (r, p) in prompts.iter().enumerate() {
            let alone = generate(&net, std::slice::from_ref(p), &greedy, None, None)?;
            assert_eq!(batched.generated_ids[r], alone.generated_ids[0], "{cell:?} row {r}");
        }
        let config = GenerationConfig { temperature: 1.5, top_k: Some(6), top_p: Some(0.9), repetition_penalty: 1.3, seed: 3, ..GenerationConfig::greedy(40) };
        let mut pieces = vec![String::new(); prompts.len()];
        let mut on_text = |r: usize, s: &str| pieces[r].push_str(s);
        let out = generate(&net, &prompts, &config, Some(&corpus), Some(&mut on_text))?;
        for r in 0..prompts.len() {
            assert_eq!(out.generated_ids[r].len(), 40);
            assert_eq!(out.texts[r], corpus.decode(&out.generated_ids[r]));
            assert_eq!(pieces[r], out.texts[r], "{cell:?} row {r}");
        }
        let again = generate(&net, &prompts, &config, None, None)?;
        assert_eq!(again.generated_ids, out.generated_ids, "seeded");
    }
    Ok(())
}

/// The Keras model of the article: Dense 128/64/32 ReLU and a softmax over 10 classes on 1000
/// features, Adam, sparse categorical cross-entropy (softmax + cross-entropy on logits here).
#[test]
fn keras_style_mlp_in_a_few_lines() -> Result<()> {
    let device = wick::device::test_device()?;
    let x = Tensor::randn(0f32, 1.0, (256, 1000), &device)?;
    let y = x.narrow(1, 0, 10)?.argmax(1)?; // a learnable rule: which of the first 10 features is largest
    let data = TensorDataset::new(x, y)?;

    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &device, 0);
    let model = Classifier { net: Mlp::load(vb, &MlpConfig::new(1000, &[128, 64, 32], 10))?, num_classes: 10 };
    let adam = OptimizerConfig::adam().build(optim::params(&varmap, |_| false))?;
    let config = TrainerConfig { epochs: 30, batch_size: 32, lr: 1e-3, progress: false, ..Default::default() };
    let report = Trainer::new(config, varmap, adam, device).fit(&model, &data, Some(&data))?;

    let probs = candle_nn::ops::softmax(&model.net.forward_t(&data.inputs.narrow(0, 0, 4)?, false)?, 1)?;
    let sums = probs.sum(1)?.to_vec1::<f32>()?;
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    assert!(report.last_eval().unwrap()["accuracy"] > 0.9, "{:?}", report.last_eval());
    Ok(())
}

/// The PyTorch net of the article: 10 → 20 → 1, MSE, SGD with lr 0.01.
#[test]
fn pytorch_style_regression_in_a_few_lines() -> Result<()> {
    let device = wick::device::test_device()?;
    let x = Tensor::randn(0f32, 1.0, (128, 10), &device)?;
    let y = x.sum_keepdim(1)?; // target: the sum of the inputs
    let data = TensorDataset::new(x, y)?;

    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &device, 0);
    let model = Regressor { net: Mlp::load(vb, &MlpConfig::new(10, &[20], 1))? };
    let sgd = OptimizerConfig::sgd().build(optim::params(&varmap, |_| false))?;
    let config = TrainerConfig { epochs: 100, batch_size: 16, lr: 0.01, progress: false, ..Default::default() };
    let report = Trainer::new(config, varmap, sgd, device).fit(&model, &data, Some(&data))?;
    let (first, last) = (report.evals[0].1["loss"], report.last_eval().unwrap()["loss"]);
    assert!(last < 0.1 && last < first / 20.0, "MSE {first} -> {last}");
    Ok(())
}

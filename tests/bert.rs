//! BERT against transformers' outputs and gradients on the same weights (fixtures made by
//! tests/fixtures/make_hf_fixtures.py), through the Hub loader.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{assert_close, fixture_path, Fixture};
use std::path::PathBuf;
use wick::models::bert::{BertForSequenceClassification, BertModel, Config};
use wick::pretrained::{self, Pretrained};
use wick::weights::{inference_var_builder, ModelFiles};

fn hf_dir(name: &str) -> PathBuf {
    fixture_path(&format!("hf/{name}"))
}

struct Inputs {
    ids: Tensor,
    mask: Tensor,
    types: Tensor,
}

fn inputs(fx: &Fixture) -> Result<Inputs> {
    Ok(Inputs { ids: fx.get("input.input_ids")?, mask: fx.get("input.attention_mask")?, types: fx.get("input.token_type_ids")? })
}

fn files(name: &str) -> Result<ModelFiles> {
    Ok(wick::hub::resolve(hf_dir(name).to_str().unwrap(), &Default::default())?)
}

/// Loads a BERT classifier folder for inference, as every command does.
fn classifier(name: &str, dtype: DType, device: &Device) -> Result<(BertForSequenceClassification, Config)> {
    pretrained::load::<BertForSequenceClassification>(&files(name)?, dtype, device)
}

/// The checkpoint's tensors by the classifier's names, and its config: for tests that damage one.
fn classifier_tensors(name: &str, device: &Device) -> Result<(Config, std::collections::HashMap<String, Tensor>)> {
    let files = files(name)?;
    let cfg: Config = files.config()?;
    let tensors = BertForSequenceClassification::canonical_names(files.load_tensors(device)?, &cfg);
    Ok((cfg, tensors))
}

fn check_base(name: &str, reference: &str) -> Result<()> {
    let fx = Fixture::load(reference)?;
    let (model, _) = pretrained::load::<BertModel>(&files(name)?, DType::F32, &fx.device)?;
    let x = inputs(&fx)?;
    let out = model.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    assert_close(&format!("{name} last_hidden_state"), &out.last_hidden_state, &fx.get("output.last_hidden_state")?, 1e-4)?;
    assert_close(&format!("{name} pooler_output"), &out.pooler_output.unwrap(), &fx.get("output.pooler_output")?, 1e-4)
}

#[test]
fn bert_model_without_prefix_matches_transformers() -> Result<()> {
    check_base("bert-tiny-base", "hf/bert-tiny-base.reference")
}

#[test]
fn legacy_gamma_beta_pytorch_bin_matches_transformers() -> Result<()> {
    check_base("bert-tiny-legacy", "hf/bert-tiny-base.reference")
}

fn check_classifier(name: &str) -> Result<()> {
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    let (model, cfg) = classifier(name, DType::F32, &fx.device)?;
    assert_eq!(cfg.labels(), ["negative", "neutral", "positive"]);
    let x = inputs(&fx)?;
    let out = model.bert.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    assert_close("last_hidden_state", &out.last_hidden_state, &fx.get("output.last_hidden_state")?, 1e-4)?;
    assert_close("pooler_output", &out.pooler_output.unwrap(), &fx.get("output.pooler_output")?, 1e-4)?;
    let logits = model.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    assert_close(&format!("{name} logits"), &logits, &fx.get("output.logits")?, 1e-4)?;
    // The same packed for encoder batches (`wick predict`, `wick embed`), where the CPU's level
    // has those panels.
    let (mut packed, _) = classifier(name, DType::F32, &fx.device)?;
    if wick::pretrained::pack_for_inference(&mut packed, wick::ops::linear::Panels::ManyRows)? > 0 {
        let logits = packed.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
        assert_close(&format!("{name} packed logits"), &logits, &fx.get("output.logits")?, 1e-4)?;
    }
    Ok(())
}

#[test]
fn sequence_classifier_matches_transformers() -> Result<()> {
    check_classifier("bert-tiny-cls")
}

#[test]
fn sharded_safetensors_load() -> Result<()> {
    check_classifier("bert-tiny-sharded")
}

#[test]
fn padding_does_not_change_the_unpadded_rows() -> Result<()> {
    // Row 0 alone (7 tokens, no padding) must equal row 0 of the padded batch.
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    let (model, _) = classifier("bert-tiny-cls", DType::F32, &fx.device)?;
    let x = inputs(&fx)?;
    let alone = model.forward(&x.ids.narrow(0, 0, 1)?.narrow(1, 0, 7)?, None, None, false)?;
    assert_close("row 0 alone", &alone, &fx.get("output.logits")?.narrow(0, 0, 1)?, 1e-4)
}

/// Builds the classifier from trainable variables (as fine-tuning does) and checks one step's
/// gradients of the cross-entropy against transformers', for every parameter.
#[test]
fn every_parameter_gets_transformers_gradient() -> Result<()> {
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    let files = files("bert-tiny-cls")?;
    let trainable = pretrained::load_trainable::<BertForSequenceClassification>(&files, &files.config()?, &fx.device, 0, |_| true)?;
    let (model, varmap, report) = (trainable.model, trainable.varmap, trainable.report);
    assert!(report.newly_initialized.is_empty() && report.unused.is_empty(), "{report:?}");
    let x = inputs(&fx)?;
    // Dropout off (transformers' reference step ran in eval mode), but the graph is tracked.
    let logits = model.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    let loss = wick::nn::cross_entropy(&logits, &fx.get("input.labels")?)?;
    assert_close("loss", &loss, &fx.get("output.loss")?, 1e-5)?;
    fx.check_grads(&varmap, &loss, 1e-4)
}

#[test]
fn base_checkpoint_gets_a_fresh_classifier_head() -> Result<()> {
    // Fine-tuning starts from an encoder-only checkpoint (like MiniLM): the head is new.
    let device = Device::Cpu;
    let files = files("bert-tiny-base")?;
    let mut cfg: Config = files.config()?;
    cfg.set_labels(&["a".into(), "b".into()]);
    let report = pretrained::load_trainable::<BertForSequenceClassification>(&files, &cfg, &device, 0, |_| true)?.report;
    assert_eq!(report.newly_initialized, ["classifier.bias", "classifier.weight"]);
    assert!(report.unused.is_empty(), "{report:?}");
    Ok(())
}

#[test]
fn training_mode_applies_dropout_and_eval_does_not() -> Result<()> {
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    let (model, _) = classifier("bert-tiny-cls", DType::F32, &fx.device)?;
    let x = inputs(&fx)?;
    let eval1 = model.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    let eval2 = model.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    assert_close("eval is deterministic", &eval1, &eval2, 0.0)?;
    wick::nn::reseed(&fx.device, 1, 0)?;
    let train = model.forward(&x.ids, Some(&x.mask), Some(&x.types), true)?;
    let diff = (train - eval1)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 1e-3, "dropout had no effect ({diff})");
    Ok(())
}

#[test]
fn half_precision_stays_close() -> Result<()> {
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    let dtype = if fx.device.is_cpu() { DType::F16 } else { DType::BF16 };
    let (model, _) = classifier("bert-tiny-cls", dtype, &fx.device)?;
    let x = inputs(&fx)?;
    let logits = model.forward(&x.ids, Some(&x.mask), Some(&x.types), false)?;
    assert_eq!(logits.dtype(), dtype);
    assert_close("half logits", &logits, &fx.get("output.logits")?, 3e-2)
}

#[test]
fn too_long_input_is_an_error() -> Result<()> {
    let device = Device::Cpu;
    let (model, cfg) = classifier("bert-tiny-cls", DType::F32, &device)?;
    let ids = Tensor::zeros((1, cfg.max_position_embeddings + 1), DType::U32, &device)?;
    let err = model.forward(&ids, None, None, false).err().expect("must fail").to_string();
    assert!(err.contains("longer than") && err.contains("max_position_embeddings"), "{err}");
    Ok(())
}

#[test]
fn config_weight_mismatch_names_the_tensor_and_both_shapes() -> Result<()> {
    let device = Device::Cpu;
    let (mut cfg, tensors) = classifier_tensors("bert-tiny-cls", &device)?;
    cfg.intermediate_size += 1;
    // Inference path: candle's VarBuilder check.
    let err = BertForSequenceClassification::load(inference_var_builder(tensors.clone(), DType::F32, &device), &cfg).err().unwrap().to_string();
    assert!(err.contains("intermediate.dense.weight") && err.contains("37") && err.contains("38"), "{err}");
    // Fine-tuning path: our copy.
    let varmap = VarMap::new();
    BertForSequenceClassification::load(wick::nn::var_builder(&varmap, DType::F32, &device, 0), &cfg)?;
    let err = format!("{:#}", wick::weights::copy_into_varmap(&varmap, &tensors).unwrap_err());
    // Whichever of the two affected tensors comes first is named, with both shapes.
    let named = err.contains("intermediate.dense") || err.contains("output.dense.weight");
    assert!(named && err.contains("37") && err.contains("38") && err.contains("do not belong together"), "{err}");
    Ok(())
}

#[test]
fn missing_weight_is_named() -> Result<()> {
    let device = Device::Cpu;
    let (cfg, mut tensors) = classifier_tensors("bert-tiny-cls", &device)?;
    tensors.remove("bert.encoder.layer.1.output.dense.bias");
    let vb = inference_var_builder(tensors, DType::F32, &device);
    let err = BertForSequenceClassification::load(vb, &cfg).err().unwrap().to_string();
    assert!(err.contains("encoder.layer.1.output.dense.bias"), "{err}");
    Ok(())
}

#[test]
fn wordpiece_from_vocab_txt_equals_tokenizer_json() -> Result<()> {
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    let dir = tempfile::tempdir()?;
    for f in ["vocab.txt", "tokenizer_config.json", "config.json"] {
        std::fs::copy(hf_dir("bert-tiny-cls").join(f), dir.path().join(f))?;
    }
    let from_vocab = wick::tokenizer::load(dir.path())?;
    let from_json = wick::tokenizer::load(&hf_dir("bert-tiny-cls"))?;
    let ids = fx.get("input.input_ids")?.to_vec2::<u32>()?;
    for (row, text) in [(0, "The movie was great!"), (2, "this film is really too long and so boring")] {
        let expected: Vec<u32> = ids[row].iter().copied().take_while(|&i| i != 0).collect();
        for (what, tok) in [("vocab.txt", &from_vocab), ("tokenizer.json", &from_json)] {
            let got = tok.encode(text, true).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
            assert_eq!(got, expected, "{what}: {text}");
        }
    }
    Ok(())
}

#[test]
fn encode_batch_pads_and_truncates() -> Result<()> {
    let tok = wick::tokenizer::load(&hf_dir("bert-tiny-cls"))?;
    let batch = wick::tokenizer::encode_batch(&tok, &["the movie was great", "a film"], 4, 0, &Device::Cpu)?;
    assert_eq!(batch.truncated, 1);
    let ids = batch.input_ids.to_vec2::<u32>()?;
    let cls = tok.token_to_id("[CLS]").unwrap();
    let sep = tok.token_to_id("[SEP]").unwrap();
    assert_eq!(ids[0].len(), 4);
    assert_eq!((ids[0][0], ids[0][3]), (cls, sep), "truncation keeps [CLS] ... [SEP]");
    assert_eq!(batch.attention_mask.to_vec2::<u32>()?, [[1, 1, 1, 1], [1, 1, 1, 1]]);
    Ok(())
}

//! The fine-tuning path of `examples/bert_finetune.rs` end to end on the tiny fixture BERT:
//! tokenized texts → shared Trainer → Hugging Face folder → reloaded through the Hub loader.

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use common::fixture_path;
use wick::data::text::{read_text_classification, LabelSet, TokenizedTexts};
use wick::data::Dataset;
use wick::hub::{self, HubOptions};
use wick::models::bert::{self, BertForSequenceClassification};
use wick::train::{checkpoint, optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

const TRAIN: &str = "sentence\tlabel\n\
the movie was great \tpos\na dull , boring film \tneg\nnot bad at all \tpos\nthis is the worst film ever \tneg\n\
i love this movie \tpos\ni hate the plot \tneg\nreally good fun \tpos\nsad and too long \tneg\n";

#[test]
fn fine_tune_save_and_reload_as_a_hugging_face_folder() -> Result<()> {
    let device = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("train.tsv");
    std::fs::write(&data, TRAIN)?;
    let files = hub::resolve(fixture_path("hf/bert-tiny-cls").to_str().unwrap(), &HubOptions::default())?;
    let mut cfg: bert::Config = files.config()?;
    let tokenizer = files.tokenizer()?;
    let examples = read_text_classification(&data, None, None)?;
    let labels = LabelSet::from_examples(&examples);
    assert_eq!(labels.names, ["neg", "pos"]);
    let set = TokenizedTexts::new(&tokenizer, &examples, &labels, 8, cfg.pad_token_id)?;
    assert_eq!(set.len(), 8);
    let batch = set.batch(&[0, 3], &device)?;
    assert_eq!(batch.input_ids.dims(), [2, 8], "padded to the longest in the batch, cut at 8");
    assert_eq!(batch.labels.to_vec1::<u32>()?, [1, 0]);

    // A new two-label head on the pretrained encoder, as the example does.
    let mut weights = bert::canonical_names(files.load_tensors(&device)?, true);
    weights.retain(|k, _| !k.starts_with("classifier."));
    cfg.set_labels(&labels.names);
    let varmap = VarMap::new();
    let model = BertForSequenceClassification::load(wick::nn::var_builder(&varmap, DType::F32, &device, 1), &cfg)?;
    assert_eq!(hub::copy_into_varmap(&varmap, &weights)?.newly_initialized, ["classifier.bias", "classifier.weight"]);
    let output = dir.path().join("run");
    let config = TrainerConfig {
        epochs: 15,
        batch_size: 4,
        lr: 3e-3,
        schedule: Schedule::LinearWarmup { warmup: 3 },
        eval_each_epoch: true,
        save_each_epoch: true,
        keep_last: 1,
        goal: Some(MetricGoal::maximize("accuracy")),
        output_dir: Some(output.clone()),
        progress: false,
        ..Default::default()
    };
    let opt = OptimizerConfig::adamw(0.01).build(optim::params(&varmap, optim::is_bias_or_norm))?;
    let mut trainer = Trainer::new(config, varmap.clone(), opt, device.clone());
    let report = trainer.fit(&model, &set, Some(&set))?;
    let best = report.best.expect("evaluated");
    assert!(best.1 >= 0.99, "the tiny model should fit 8 texts, best accuracy {}", best.1);
    assert_eq!(trainer.restore_best()?, Some(best.0));
    hub::save_pretrained(&output, &cfg, &checkpoint::varmap_tensors(&varmap)?, Some(&files.dir))?;

    // The folder loads through the Hub loader, with its labels and tokenizer, and predicts the same.
    let saved = hub::resolve(output.to_str().unwrap(), &HubOptions::default())?;
    let saved_cfg: bert::Config = saved.config()?;
    assert_eq!(saved_cfg.labels(), ["neg", "pos"]);
    assert_eq!(saved_cfg.label2id.as_ref().unwrap()["pos"], 1);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(saved.config.clone())?)?;
    assert_eq!(json["model_type"], "bert", "transformers' AutoModel needs model_type");
    assert!(saved.dir.join("vocab.txt").is_file() && saved.dir.join("tokenizer.json").is_file());
    let reloaded = BertForSequenceClassification::load(
        hub::inference_var_builder(bert::canonical_names(saved.load_tensors(&device)?, true), DType::F32, &device),
        &saved_cfg,
    )?;
    let b = set.batch(&(0..8).collect::<Vec<_>>(), &device)?;
    let before = model.forward(&b.input_ids, Some(&b.attention_mask), Some(&b.token_type_ids), false)?;
    let after = reloaded.forward(&b.input_ids, Some(&b.attention_mask), Some(&b.token_type_ids), false)?;
    common::assert_close("reloaded logits", &after, &before, 1e-6)?;
    // The saved files hold no leftovers from an interrupted write.
    assert!(std::fs::read_dir(&output)?.all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
    Ok(())
}

#[test]
fn empty_or_unlabelled_data_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let files = hub::resolve(fixture_path("hf/bert-tiny-cls").to_str().unwrap(), &HubOptions::default())?;
    let tokenizer = files.tokenizer()?;
    let labels = LabelSet { names: vec!["neg".into(), "pos".into()] };
    let err = TokenizedTexts::new(&tokenizer, &[], &labels, 8, 0).err().unwrap().to_string();
    assert!(err.contains("no examples"), "{err}");
    let path = dir.path().join("x.tsv");
    std::fs::write(&path, "sentence\tlabel\ngood \tmaybe\n")?;
    let examples = read_text_classification(&path, None, None)?;
    let err = TokenizedTexts::new(&tokenizer, &examples, &labels, 8, 0).err().unwrap().to_string();
    assert!(err.contains("maybe") && err.contains("not one of the training labels"), "{err}");
    Ok(())
}

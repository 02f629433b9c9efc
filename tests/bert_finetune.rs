//! Fine-tuning and prediction end to end on the tiny fixture BERT: labelled files → tokenized
//! texts → shared Trainer → Hugging Face folder → reloaded through the Hub loader; and the
//! `wick finetune` / `wick predict` library commands (classification, sentence pairs,
//! regression, whole-file prediction) with their metrics checked by hand.

mod common;

use wick::pretrained::{self, Trainable};

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Parser;
use common::fixture_path;
use std::path::{Path, PathBuf};
use wick::cmd::finetune::{finetune, FinetuneArgs};
use wick::cmd::predict::{predict_file, PredictArgs, Predictor};
use wick::data::text::{read_text_file, LabelSet, Targets, TextColumns, TokenizedTexts};
use wick::data::Dataset;
use wick::hub::{self, HubOptions};
use wick::models::bert::{self, BertForSequenceClassification};
use wick::train::metrics::{pearson, spearman};
use wick::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

const TRAIN: &str = "sentence\tlabel\n\
the movie was great \tpos\na dull , boring film \tneg\nnot bad at all \tpos\nthis is the worst film ever \tneg\n\
i love this movie \tpos\ni hate the plot \tneg\nreally good fun \tpos\nsad and too long \tneg\n";

/// STS-B's layout (index, genre, the pair, a 0–5 similarity score).
const STSB: &str = "index\tgenre\tsentence1\tsentence2\tscore\n\
0\tmain\tthe movie was great\tthe film was great\t4.800\n1\tmain\ti love this movie\ti hate the plot\t0.600\n\
2\tmain\treally good fun\tvery good fun\t4.250\n3\tmain\tthe worst film ever\tthe best film ever\t1.500\n\
4\tmain\tsad and too long\ttoo long and sad\t4.000\n5\tmain\tthe music is good\tthe story is bad\t0.750\n\
6\tmain\ta dull , boring film\ta boring film\t3.600\n7\tmain\ti like the end\tthe end\t2.200\n";

fn tiny_model() -> String {
    fixture_path("hf/bert-tiny-cls").to_string_lossy().into_owned()
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[derive(Parser)]
struct Finetune {
    #[command(flatten)]
    args: FinetuneArgs,
}

#[derive(Parser)]
struct Predict {
    #[command(flatten)]
    args: PredictArgs,
}

fn finetune_args(argv: &[&str]) -> Result<FinetuneArgs, clap::Error> {
    Finetune::try_parse_from(std::iter::once("finetune").chain(argv.iter().copied())).map(|c| c.args)
}

/// `finetune` of the fixture model on `data` (its evaluation set too) into `out`, with `extra` flags.
fn tiny_finetune_args(data: &Path, out: &Path, extra: &[&str]) -> FinetuneArgs {
    let (model, data, out) = (tiny_model(), data.to_str().unwrap(), out.to_str().unwrap());
    let argv: Vec<&str> = ["--model", &model, "--train", data, "--eval", data, "--output", out].into_iter().chain(extra.iter().copied()).collect();
    finetune_args(&argv).unwrap()
}

fn predict_args(argv: &[&str]) -> Result<PredictArgs, clap::Error> {
    Predict::try_parse_from(std::iter::once("predict").chain(argv.iter().copied())).map(|c| c.args)
}

#[test]
fn fine_tune_save_and_reload_as_a_hugging_face_folder() -> Result<()> {
    let device = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "train.tsv", TRAIN);
    let files = hub::resolve(&tiny_model(), &HubOptions::default())?;
    let mut cfg: bert::Config = files.config()?;
    let tokenizer = files.tokenizer()?;
    let file = read_text_file(&data, &TextColumns::default(), true)?;
    let labels = LabelSet::from_examples(&file.examples);
    assert_eq!(labels.names, ["neg", "pos"]);
    let set = TokenizedTexts::new(&tokenizer, &file.examples, Targets::Classes(file.class_ids(&labels)?), 8, cfg.pad_token_id)?;
    assert_eq!(set.len(), 8);
    let batch = set.batch(&[0, 3], &device)?;
    assert_eq!(batch.input_ids.dims(), [2, 8], "padded to the longest in the batch, cut at 8");
    assert_eq!(batch.labels.as_ref().unwrap().to_vec1::<u32>()?, [1, 0]);

    // A new two-label head on the pretrained encoder, as `finetune` does.
    cfg.set_labels(&labels.names);
    let keep = |name: &str| !name.starts_with("classifier.");
    let Trainable { model, varmap, report } = pretrained::load_trainable::<BertForSequenceClassification>(&files, &cfg, &device, 1, keep)?;
    assert_eq!(report.newly_initialized, ["classifier.bias", "classifier.weight"]);
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
    pretrained::save_varmap::<BertForSequenceClassification>(&output, &cfg, &varmap, Some(&files.dir))?;

    // The folder loads through the Hub loader, with its labels and tokenizer, and predicts the same.
    let saved = hub::resolve(output.to_str().unwrap(), &HubOptions::default())?;
    let saved_cfg: bert::Config = saved.config()?;
    assert_eq!(saved_cfg.labels(), ["neg", "pos"]);
    assert_eq!(saved_cfg.label2id.as_ref().unwrap()["pos"], 1);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(saved.config.clone())?)?;
    assert_eq!(json["model_type"], "bert", "transformers' AutoModel needs model_type");
    assert!(saved.dir.join("vocab.txt").is_file() && saved.dir.join("tokenizer.json").is_file());
    let (reloaded, _) = pretrained::load::<BertForSequenceClassification>(&saved, DType::F32, &device)?;
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
    let tokenizer = hub::resolve(&tiny_model(), &HubOptions::default())?.tokenizer()?;
    let labels = LabelSet { names: vec!["neg".into(), "pos".into()] };
    let err = TokenizedTexts::new(&tokenizer, &[], Targets::None, 8, 0).err().unwrap().to_string();
    assert!(err.contains("no examples"), "{err}");
    let path = write(dir.path(), "x.tsv", "sentence\tlabel\ngood \tmaybe\n");
    let file = read_text_file(&path, &TextColumns::default(), true)?;
    let err = format!("{:#}", file.class_ids(&labels).unwrap_err());
    assert!(err.contains("x.tsv line 2, column \"label\"") && err.contains("\"maybe\" is not one of the model's labels"), "{err}");
    Ok(())
}

/// Per-row predictions of `model_dir` for every row of `file`, each text run alone: what
/// `predict --input` must agree with.
fn predict_rows_alone(model_dir: &str, file: &Path) -> Result<Vec<Vec<f32>>> {
    let predictor = Predictor::load(&wick::cli::ModelArgs::new(model_dir), &Default::default(), None)?;
    let rows = read_text_file(file, &TextColumns::default(), false)?;
    let mut out = Vec::new();
    for example in &rows.examples {
        let set = predictor.tokenize(std::slice::from_ref(example), Targets::None)?;
        let b = set.batch(&[0], &Device::Cpu)?;
        let logits = predictor.model.forward(&b.input_ids, Some(&b.attention_mask), Some(&b.token_type_ids), false)?;
        out.push(logits.squeeze(0)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

#[test]
fn predict_input_reports_the_accuracy_of_every_row() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The fixture classifier's labels are negative/neutral/positive.
    let labels = ["positive", "negative", "neutral", "negative", "positive", "positive", "neutral"];
    let texts = ["the movie was great", "a dull , boring film", "it is a film", "the worst film ever", "i love this music", "so sad", "one scene"];
    let rows: String = texts.iter().zip(labels).map(|(t, l)| format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n")).collect();
    let file = write(dir.path(), "rows.jsonl", &rows);
    let by_hand = predict_rows_alone(&tiny_model(), &file)?;
    let names = ["negative", "neutral", "positive"];
    let correct = by_hand.iter().zip(labels).filter(|(row, l)| names[argmax(row)] == *l).count();
    // Batches of 3 (7 rows: 3 + 3 + 1) give what each row alone gives.
    let summary = predict_file(&predict_args(&["--model", &tiny_model(), "--input", file.to_str().unwrap(), "--batch-size", "3", "--json"])?)?;
    assert_eq!(summary["rows"], 7);
    assert!((summary["accuracy"].as_f64().unwrap() - correct as f64 / 7.0).abs() < 1e-12, "{summary} vs {correct} correct by hand");
    assert!(summary.get("f1").is_none(), "F1 is for two classes");
    // Without a label column: predictions only.
    let unlabelled = write(dir.path(), "texts.tsv", "sentence\nthe movie was great\n");
    let summary = predict_file(&predict_args(&["--model", &tiny_model(), "--input", unlabelled.to_str().unwrap(), "--json"])?)?;
    assert_eq!(summary["rows"], 1);
    assert!(summary.get("accuracy").is_none());
    // A label the model does not know names the row.
    let bad = write(dir.path(), "bad.tsv", "sentence\tlabel\ngood\tpositive\nfine\tgreat\n");
    let err = format!("{:#}", predict_file(&predict_args(&["--model", &tiny_model(), "--input", bad.to_str().unwrap()])?).unwrap_err());
    assert!(err.contains("bad.tsv line 3, column \"label\"") && err.contains("\"great\""), "{err}");
    Ok(())
}

#[test]
fn finetune_pairs_for_two_classes_then_predict_gives_accuracy_and_f1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // RTE's layout: the pair goes in as segments A and B.
    let rte = "index\tsentence1\tsentence2\tlabel\n0\tthe movie was great\ti love it\tentailment\n1\tthe movie was bad\ti love it\tnot_entailment\n\
2\treally good fun\tit is good\tentailment\n3\tsad and too long\tit is fun\tnot_entailment\n4\tthe best film ever\ti like it\tentailment\n\
5\tthe worst film ever\ti like it\tnot_entailment\n";
    let data = write(dir.path(), "rte.tsv", rte);
    let out = dir.path().join("rte-model");
    let (metrics, summary) = finetune(&tiny_finetune_args(&data, &out, &["--epochs", "4", "--batch-size", "3", "--lr", "1e-3", "--json"]))?;
    assert_eq!(summary["task"], "classification");
    assert!(metrics.contains_key("f1") && summary["eval_f1"].is_number(), "{summary}");
    let cfg: bert::Config = hub::resolve(out.to_str().unwrap(), &HubOptions::default())?.config()?;
    assert_eq!(cfg.labels(), ["entailment", "not_entailment"]);

    let by_hand = predict_rows_alone(out.to_str().unwrap(), &data)?;
    let truth = [0, 1, 0, 1, 0, 1];
    let predicted: Vec<usize> = by_hand.iter().map(|r| argmax(r)).collect();
    let count = |p: usize, t: usize| predicted.iter().zip(truth).filter(|&(&a, b)| a == p && b == t).count() as f64;
    let (tp, fp, fn_) = (count(1, 1), count(1, 0), count(0, 1));
    let accuracy = predicted.iter().zip(truth).filter(|&(&a, b)| a == b).count() as f64 / 6.0;
    let f1 = if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) };
    let summary = predict_file(&predict_args(&["--model", out.to_str().unwrap(), "--input", data.to_str().unwrap(), "--json"])?)?;
    assert!((summary["accuracy"].as_f64().unwrap() - accuracy).abs() < 1e-12, "{summary}");
    assert!((summary["f1"].as_f64().unwrap() - f1).abs() < 1e-12, "{summary}");
    assert!((summary["accuracy"].as_f64().unwrap() - metrics["accuracy"]).abs() < 1e-12, "predict agrees with finetune's evaluation");
    Ok(())
}

#[test]
fn regression_finetune_saves_a_regressor_and_predict_reports_its_correlations() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "stsb.tsv", STSB);
    let out = dir.path().join("stsb-model");
    let (metrics, summary) = finetune(&tiny_finetune_args(&data, &out, &["--epochs", "5", "--batch-size", "4", "--lr", "2e-3", "--json"]))?;
    assert_eq!(summary["task"], "regression");
    for key in ["eval_loss", "eval_pearson", "eval_spearman"] {
        assert!(summary[key].is_number(), "{key} in {summary}");
    }
    assert!(summary.get("eval_accuracy").is_none());

    // Saved as transformers saves `num_labels=1, problem_type="regression"`.
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(json["problem_type"], "regression");
    assert_eq!(json["id2label"], serde_json::json!({ "0": "LABEL_0" }));
    let cfg: bert::Config = serde_json::from_value(json)?;
    assert!(cfg.is_regression() && cfg.num_labels() == 1);

    // Reloaded: predict's correlations and MSE are those of the per-row scores, by hand.
    let scores: Vec<f64> = predict_rows_alone(out.to_str().unwrap(), &data)?.iter().map(|r| r[0] as f64).collect();
    assert_eq!(scores.len(), 8);
    let truth = [4.8, 0.6, 4.25, 1.5, 4.0, 0.75, 3.6, 2.2];
    let mse = scores.iter().zip(truth).map(|(s, t)| (s - t).powi(2)).sum::<f64>() / 8.0;
    let summary = predict_file(&predict_args(&["--model", out.to_str().unwrap(), "--input", data.to_str().unwrap(), "--batch-size", "5", "--json"])?)?;
    assert!((summary["pearson"].as_f64().unwrap() - pearson(&scores, &truth)).abs() < 1e-5, "{summary}");
    assert!((summary["spearman"].as_f64().unwrap() - spearman(&scores, &truth)).abs() < 1e-9, "{summary}");
    assert!((summary["loss"].as_f64().unwrap() - mse).abs() < 1e-4 * mse.max(1.0), "{summary} vs mse {mse}");
    assert!((summary["pearson"].as_f64().unwrap() - metrics["pearson"]).abs() < 1e-5, "predict agrees with finetune's evaluation");

    // Non-numeric scores are an error naming the row, for finetune and predict alike.
    let bad = write(dir.path(), "bad.tsv", &format!("{STSB}8\tmain\ta\tb\tn/a\n"));
    let err = format!("{:#}", predict_file(&predict_args(&["--model", out.to_str().unwrap(), "--input", bad.to_str().unwrap()])?).unwrap_err());
    assert!(err.contains("bad.tsv line 10, column \"score\"") && err.contains("\"n/a\" is not a finite number"), "{err}");
    let err = format!("{:#}", finetune(&tiny_finetune_args(&bad, &dir.path().join("x"), &["--task", "regression", "--json"])).unwrap_err());
    assert!(err.contains("bad.tsv line 10"), "{err}");
    Ok(())
}

#[test]
fn bad_flags_are_refused_before_any_work() -> Result<()> {
    let base = ["--model", "m", "--train", "t.tsv", "--eval", "e.tsv"];
    for (flag, value) in [
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--eval-batch-size", "0"),
        ("--grad-accum", "0"),
        ("--lr", "NaN"),
        ("--lr", "-1"),
        ("--warmup-ratio", "2"),
        ("--warmup-ratio", "NaN"),
        ("--max-grad-norm", "-1"),
        ("--max-grad-norm", "NaN"),
        ("--weight-decay", "-0.1"),
        ("--minutes", "NaN"),
        ("--minutes", "-1"),
        ("--minutes", "1e300"),
        ("--max-len", "0"),
        ("--max-train-examples", "0"),
        ("--eval-every", "0"),
        ("--task", "ranking"),
    ] {
        // `--flag=value`: clap would read a separate "-1" as a flag of its own.
        let flag_value = format!("{flag}={value}");
        let argv: Vec<&str> = base.iter().copied().chain([flag_value.as_str()]).collect();
        let err = finetune_args(&argv).err().unwrap_or_else(|| panic!("{flag} {value} accepted")).to_string();
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
    assert!(finetune_args(&base.iter().copied().chain(["--max-grad-norm", "0"]).collect::<Vec<_>>()).is_ok(), "0 turns clipping off");
    assert!(predict_args(&["--model", "m"]).is_err(), "--text or --input is needed");
    assert!(predict_args(&["--model", "m", "--text", "a", "--input", "f.tsv"]).is_err());
    assert!(predict_args(&["--model", "m", "--input", "f.tsv", "--batch-size", "0"]).is_err());

    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "train.tsv", TRAIN);
    let model = tiny_model();
    let err = wick::cmd::predict::run(predict_args(&["--model", &model, "--text", "good", "--dtype", "bf16"])?).unwrap_err().to_string();
    assert!(err.contains("--dtype bf16") && err.contains("cuda"), "{err}");
    let err = wick::cmd::predict::run(predict_args(&["--model", &model, "--text", "good", "--max-len", "41"])?).unwrap_err().to_string();
    assert!(err.contains("--max-len 41") && err.contains("max_position_embeddings 40"), "{err}");
    let err = wick::cmd::predict::run(predict_args(&["--model", &model, "--text", "a", "--text", "b", "--text-pair", "c"])?).unwrap_err().to_string();
    assert!(err.contains("one --text-pair for each --text"), "{err}");
    let output = dir.path().join("o");
    let args = |extra: &[&str]| tiny_finetune_args(&data, &output, extra);
    let err = finetune(&args(&["--max-len", "41"])).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings 40"), "{err}");
    let err = finetune(&args(&["--dtype", "f16"])).unwrap_err().to_string();
    assert!(err.contains("--dtype f16"), "{err}");
    let err = format!("{:#}", finetune(&args(&["--label-column", "stars"])).unwrap_err());
    assert!(err.contains("no label column \"stars\"") && err.contains("[\"sentence\", \"label\"]"), "{err}");
    Ok(())
}

//! `wick predict`: run a fine-tuned BERT classifier or regressor on texts, sentence pairs, or
//! every row of a file.
//!
//! `--text` (with `--text-pair` for pairs) runs the given texts as one batch and prints a
//! table, or with `--json` one object `{"labels", "probs", "logits"}` (`{"scores", "logits"}`
//! for a regressor) in input order. `--input FILE` reads a TSV/CSV/JSONL file as `finetune`
//! does, runs it in batches behind a progress bar and prints one line per row (with `--json`
//! one object per row); when the file has labels, the summary reports accuracy (and F1 for
//! two classes) or Pearson/Spearman correlation, and with `--json` the last line is the summary
//! object (`rows`, the metrics, `seconds`).

use super::finetune::{checked_max_len, resolve_bert};
use crate::cli::{at_least_one, ModelArgs, RunArgs};
use crate::data::text::{read_text_file, LabelSet, Targets, TextColumns, TextExample, TokenizedTexts};
use crate::data::{Batching, Dataset};
use crate::models::bert::{self, BertForSequenceClassification};
use crate::pretrained;
use crate::train::{metrics, EvalBatch, Metrics, TrainModel};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, D};
use indicatif::ProgressBar;
use std::path::PathBuf;

/// Classify (or score) texts, sentence pairs or a whole file with a fine-tuned model folder (or
/// Hub repo id).
#[derive(clap::Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text to classify; repeat for several (they run as one batch).
    #[arg(long = "text", required_unless_present = "input", conflicts_with = "input")]
    pub texts: Vec<String>,
    /// The second text of a sentence pair, one for each --text, in the same order.
    #[arg(long = "text-pair", requires = "texts")]
    pub text_pairs: Vec<String>,
    /// A .tsv, .csv or .jsonl file whose every row is predicted (columns as for finetune); with
    /// a label column, accuracy (and F1 for two classes) or Pearson/Spearman is reported.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub columns: TextColumns,
    /// Rows per batch with --input.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Tokens per text or pair, special tokens included (default: the model's maximum).
    #[arg(long, value_parser = at_least_one)]
    pub max_len: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// A loaded classifier or regressor, with what it needs to read text.
pub struct Predictor {
    pub model: BertForSequenceClassification,
    pub labels: LabelSet,
    tokenizer: tokenizers::Tokenizer,
    pad_id: u32,
    max_len: usize,
    device: Device,
}

/// One row's result.
pub enum Prediction {
    Class { label: String, probs: Vec<f32>, logits: Vec<f32> },
    Score(f32),
}

impl Prediction {
    fn json(&self) -> serde_json::Value {
        match self {
            Self::Class { label, probs, logits } => serde_json::json!({ "label": label, "probs": probs, "logits": logits }),
            Self::Score(score) => serde_json::json!({ "score": score, "logits": [score] }),
        }
    }

    /// The label (or score) and, for a class, its probability.
    fn table_cells(&self) -> String {
        match self {
            Self::Class { label, probs, .. } => {
                let p = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                format!("{label}\t{p:.3}")
            }
            Self::Score(score) => format!("{score:.4}"),
        }
    }
}

impl Predictor {
    /// Loads `model` for inference; f16/bf16 (`--dtype`) only on CUDA.
    pub fn load(model: &ModelArgs, run: &RunArgs, max_len: Option<usize>) -> Result<Self> {
        let (device, dtype) = run.device_and_dtype(&[DType::F32])?;
        let files = resolve_bert(model, run.json)?;
        let cfg: bert::Config = files.config()?;
        let max_len = checked_max_len(max_len, cfg.max_position_embeddings, &cfg)?;
        let (net, _) = pretrained::load::<BertForSequenceClassification>(&files, dtype, &device).map_err(|e| {
            if format!("{e:#}").contains("classifier.weight") {
                anyhow::anyhow!("{} has no classifier head (classifier.weight): fine-tune it with `wick finetune` first", model.model)
            } else {
                e
            }
        })?;
        let mut net = net;
        pretrained::pack_for_inference(&mut net, crate::ops::linear::Panels::ManyRows)?;
        Ok(Self { model: net, labels: LabelSet { names: cfg.labels() }, tokenizer: files.tokenizer()?, pad_id: cfg.pad_token_id, max_len, device })
    }

    /// Tokenizes `examples` at this predictor's maximum length, noting how many were cut.
    pub fn tokenize(&self, examples: &[TextExample], targets: Targets) -> Result<TokenizedTexts> {
        let set = TokenizedTexts::new(&self.tokenizer, examples, targets, self.max_len, self.pad_id)?;
        if set.truncated > 0 {
            eprintln!("note: {} of {} inputs cut to {} tokens", set.truncated, set.len(), self.max_len);
        }
        Ok(set)
    }

    /// Predicts every row of `set` in order, `batch_size` rows at a time, handing each batch's
    /// predictions to `each`; returns the evaluation of the rows' targets (empty without).
    pub fn predict(&self, set: &TokenizedTexts, batch_size: usize, bar: &ProgressBar, mut each: impl FnMut(Vec<Prediction>) -> Result<()>) -> Result<Vec<EvalBatch>> {
        let mut evaluation = Vec::new();
        for rows in Batching::sequential(batch_size).epoch(set.len(), 0)? {
            let batch = set.batch(&rows, &self.device)?;
            let logits = self.model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&batch.token_type_ids), false)?.to_dtype(DType::F32)?;
            let rows_logits = logits.to_vec2::<f32>()?;
            if let Some(i) = rows_logits.iter().position(|r| r.iter().any(|x| !x.is_finite())) {
                bail!("row {}: the model's output is not finite ({:?}); its weights may hold NaN or infinity", rows[i] + 1, rows_logits[i]);
            }
            if let Some(labels) = &batch.labels {
                evaluation.push(self.model.eval_batch(&logits, labels)?);
            }
            let predictions = if self.model.is_regression() {
                rows_logits.into_iter().map(|r| Prediction::Score(r[0])).collect()
            } else {
                let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
                let ids = crate::nn::argmax_last(&logits)?;
                rows_logits
                    .into_iter()
                    .zip(probs)
                    .zip(ids)
                    .map(|((logits, probs), id)| Prediction::Class { label: self.labels.names[id as usize].clone(), probs, logits })
                    .collect()
            };
            each(predictions)?;
            bar.inc(rows.len() as u64);
        }
        Ok(evaluation)
    }
}

/// Runs `wick predict`.
pub fn run(args: PredictArgs) -> Result<()> {
    match &args.input {
        Some(_) => predict_file(&args).map(|_| ()),
        None => predict_texts(&args),
    }
}

/// `--text`/`--text-pair`: one batch, a table or one JSON object.
fn predict_texts(args: &PredictArgs) -> Result<()> {
    if args.columns.text.is_some() || args.columns.text_pair.is_some() || args.columns.label.is_some() {
        bail!("--text-column, --text-pair-column and --label-column choose the columns of an --input file; with --text give the texts themselves");
    }
    if !args.text_pairs.is_empty() && args.text_pairs.len() != args.texts.len() {
        bail!("{} --text but {} --text-pair: give one --text-pair for each --text", args.texts.len(), args.text_pairs.len());
    }
    let predictor = Predictor::load(&args.model, &args.run, args.max_len)?;
    let examples: Vec<TextExample> = args
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| TextExample::unlabelled(t.clone(), args.text_pairs.get(i).cloned()))
        .collect();
    let set = predictor.tokenize(&examples, Targets::None)?;
    let mut predictions = Vec::new();
    predictor.predict(&set, set.len(), &ProgressBar::hidden(), |batch| {
        predictions.extend(batch);
        Ok(())
    })?;
    if args.run.json {
        println!("{}", texts_json(&predictions));
    } else {
        for (p, e) in predictions.iter().zip(&examples) {
            println!("{}\t{}", p.table_cells(), shown_text(e));
        }
    }
    Ok(())
}

/// `--text --json`'s object: `{"labels", "probs", "logits"}`, or `{"scores", "logits"}` for a
/// regressor, each in input order.
fn texts_json(predictions: &[Prediction]) -> serde_json::Value {
    let mut labels = Vec::new();
    let mut probs = Vec::new();
    let mut logits = Vec::new();
    let mut scores = Vec::new();
    for p in predictions {
        match p {
            Prediction::Class { label, probs: p, logits: l } => {
                labels.push(label.clone());
                probs.push(p.clone());
                logits.push(l.clone());
            }
            Prediction::Score(s) => {
                scores.push(*s);
                logits.push(vec![*s]);
            }
        }
    }
    if scores.is_empty() {
        serde_json::json!({ "labels": labels, "probs": probs, "logits": logits })
    } else {
        serde_json::json!({ "scores": scores, "logits": logits })
    }
}

/// `--input FILE`: every row, one output line each, then the summary (returned too): `rows`,
/// `seconds`, and with labels the metrics (`accuracy`, `f1` for two classes, `loss`; or
/// `pearson`, `spearman`, `loss`).
pub fn predict_file(args: &PredictArgs) -> Result<serde_json::Value> {
    let path = args.input.as_ref().context("predict_file needs --input")?;
    if !args.texts.is_empty() {
        bail!("--text and --input cannot be used together");
    }
    let start = std::time::Instant::now();
    let predictor = Predictor::load(&args.model, &args.run, args.max_len)?;
    let file = read_text_file(path, &args.columns, false)?;
    let targets = match (file.has_labels(), predictor.model.is_regression()) {
        (false, _) => Targets::None,
        (true, true) => Targets::Scores(file.scores()?),
        (true, false) => Targets::Classes(file.class_ids(&predictor.labels)?),
    };
    let set = predictor.tokenize(&file.examples, targets)?;
    let bar = super::progress_bar(set.len(), "rows", args.run.json);
    let mut rows = file.examples.iter();
    let evaluation = predictor.predict(&set, args.batch_size, &bar, |batch| {
        bar.suspend(|| {
            for (p, example) in batch.iter().zip(rows.by_ref()) {
                if args.run.json {
                    println!("{}", p.json());
                } else {
                    println!("{}\t{}", p.table_cells(), shown_text(example));
                }
            }
        });
        Ok(())
    })?;
    bar.finish_and_clear();
    let metrics: Metrics = if evaluation.is_empty() { Metrics::new() } else { metrics::summarize(predictor.model.task(), &evaluation) };
    let mut summary = serde_json::json!({ "rows": set.len(), "seconds": start.elapsed().as_secs_f64(), "input": path });
    for (name, value) in &metrics {
        summary[name] = serde_json::json!(value);
    }
    if args.run.json {
        println!("{summary}");
    } else if metrics.is_empty() {
        eprintln!("{} rows predicted (the file has no label column)", set.len());
    } else {
        let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        eprintln!("{} on {} rows", shown.join(", "), set.len());
    }
    Ok(summary)
}

/// The text, and its pair after a tab, for a table line.
fn shown_text(e: &TextExample) -> String {
    match &e.text_pair {
        Some(b) => format!("{}\t{b}", e.text),
        None => e.text.clone(),
    }
}


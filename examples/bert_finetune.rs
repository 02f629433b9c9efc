//! Fine-tune a BERT model for text classification, and predict with the result.
//!
//! cargo run --release --example bert_finetune -- train --model ../shared/data/all-MiniLM-L6-v2 \
//!     --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv --output runs/sst2
//! cargo run --release --example bert_finetune -- predict --model runs/sst2 --text "a great film"
//!
//! The output folder is a Hugging Face model folder (config.json with id2label,
//! model.safetensors, tokenizer) that `transformers` loads with `from_pretrained`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, D};
use candle_nn::VarMap;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use wick::data::text::{read_text_classification, LabelSet, TokenizedTexts};
use wick::data::Dataset;
use wick::hub::{self, HubOptions};
use wick::models::bert::{self, BertForSequenceClassification};
use wick::train::{checkpoint, optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

/// Fine-tune BERT-family models on labelled text, and classify text with the result.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune a model on a labelled text file; the best epoch (by eval accuracy) is saved to
    /// --output as a Hugging Face model folder.
    Train(TrainArgs),
    /// Classify texts with a fine-tuned model folder (or Hub repo id).
    Predict(PredictArgs),
}

#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// A Hub repo id (e.g. sentence-transformers/all-MiniLM-L6-v2) or a local model folder.
    #[arg(long)]
    model: String,
    /// Hub branch, tag or commit of --model (default: main).
    #[arg(long)]
    revision: Option<String>,
}

impl ModelArgs {
    fn resolve(&self) -> Result<hub::ModelFiles> {
        let files = hub::resolve(&self.model, &HubOptions::default().revision(self.revision.clone()))?;
        files.check_model_type(&["bert"])?;
        Ok(files)
    }
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Training data: .tsv, .csv or .jsonl with a header/keys naming a text and a label column
    /// (GLUE SST-2's train.tsv works as is).
    #[arg(long)]
    train: PathBuf,
    /// Evaluation data, same format; evaluated after every epoch.
    #[arg(long)]
    eval: PathBuf,
    /// Text column (default: the first of sentence, text, review, content).
    #[arg(long)]
    text_column: Option<String>,
    /// Label column (default: the first of label, labels, target, class).
    #[arg(long)]
    label_column: Option<String>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Texts per optimizer step (before accumulation).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Accumulate gradients over this many batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Fraction of the steps spent warming the learning rate up from 0; it then decays
    /// linearly to 0.
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    /// AdamW weight decay (not applied to biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip the gradients' global norm to this value (0 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Tokens per text, special tokens included; longer texts are cut (default: 128, or the
    /// model's maximum if smaller).
    #[arg(long)]
    max_len: Option<usize>,
    /// Use only the first N training rows.
    #[arg(long)]
    max_train_examples: Option<usize>,
    /// Use only the first N evaluation rows.
    #[arg(long)]
    max_eval_examples: Option<usize>,
    /// Also evaluate every N optimizer steps (besides each epoch's end).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after this many minutes, saving a checkpoint (resume with --resume).
    #[arg(long)]
    minutes: Option<f64>,
    #[command(flatten)]
    run: wick::cli::RunArgs,
    #[command(flatten)]
    out: wick::cli::OutputArgs,
}

#[derive(clap::Args, Debug)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A text to classify; repeat for several (they are classified as one batch).
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// Tokens per text, special tokens included (default: the model's maximum).
    #[arg(long)]
    max_len: Option<usize>,
    /// Where to run: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights' dtype: f32, f16 or bf16 (bf16 needs CUDA).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print one JSON object {"labels", "probs", "logits"} (in input order) instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    match Cli::parse().command {
        Command::Train(args) => train(args),
        Command::Predict(args) => predict(args),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let output = args.out.output.clone().context("train needs --output DIR: the fine-tuned model is saved there")?;
    let device = args.run.device()?;
    let files = args.model.resolve()?;
    let mut cfg: bert::Config = files.config()?;
    let tokenizer = files.tokenizer()?;
    let max_len = args.max_len.unwrap_or(128.min(cfg.max_position_embeddings));
    if max_len > cfg.max_position_embeddings {
        bail!("--max-len {max_len} is longer than this model allows (max_position_embeddings {})", cfg.max_position_embeddings);
    }

    let read = |path: &PathBuf, limit: Option<usize>| -> Result<_> {
        let mut examples = read_text_classification(path, args.text_column.as_deref(), args.label_column.as_deref())?;
        examples.truncate(limit.unwrap_or(usize::MAX));
        if examples.is_empty() {
            bail!("{}: no examples to use (--max-*-examples 0?)", path.display());
        }
        Ok(examples)
    };
    let train_examples = read(&args.train, args.max_train_examples)?;
    let eval_examples = read(&args.eval, args.max_eval_examples)?;
    let labels = LabelSet::from_examples(&train_examples);
    if labels.len() < 2 {
        bail!("{}: only one label ({:?}) in the training rows; a classifier needs two or more", args.train.display(), labels.names);
    }
    let pad = cfg.pad_token_id;
    let train_set = TokenizedTexts::new(&tokenizer, &train_examples, &labels, max_len, pad).context("training data")?;
    let eval_set = TokenizedTexts::new(&tokenizer, &eval_examples, &labels, max_len, pad).context("evaluation data")?;

    let mut weights = bert::canonical_names(files.load_tensors(&device)?, true);
    if cfg.labels() != labels.names {
        if weights.keys().any(|k| k.starts_with("classifier.")) {
            eprintln!("note: the checkpoint's classifier was trained for labels {:?}; starting a new head for {:?}", cfg.labels(), labels.names);
        }
        weights.retain(|k, _| !k.starts_with("classifier."));
        cfg.set_labels(&labels.names);
    }
    let varmap = VarMap::new();
    let model = BertForSequenceClassification::load(wick::nn::var_builder(&varmap, DType::F32, &device, args.run.seed), &cfg)?;
    if let Some(warning) = hub::copy_into_varmap(&varmap, &weights)?.warning() {
        eprintln!("note: {warning}");
    }
    drop(weights);

    let mut config = TrainerConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        eval_batch_size: 64,
        grad_accum: args.grad_accum,
        lr: args.lr,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        eval_every: args.eval_every,
        eval_each_epoch: true,
        save_each_epoch: true,
        keep_last: 1,
        goal: Some(MetricGoal::maximize("accuracy")),
        time_limit: args.minutes.map(|m| std::time::Duration::from_secs_f64(m * 60.0)),
        log_every: 10,
        ..args.out.trainer_config(&args.run)
    };
    let total = config.total_steps(train_set.len());
    config.schedule = Schedule::LinearWarmup { warmup: Schedule::warmup_steps(args.warmup_ratio, total) };
    let params = optim::params(&varmap, optim::is_bias_or_norm);
    let optimizer = OptimizerConfig::adamw(args.weight_decay).build(params)?;
    if !args.run.json {
        eprintln!(
            "fine-tuning {} ({} labels) on {} texts (mean {:.1} tokens, {} cut at {}), evaluating on {}; {total} steps on {}",
            args.model.model,
            labels.len(),
            train_set.len(),
            train_set.mean_len(),
            train_set.truncated,
            max_len,
            eval_set.len(),
            wick::device::device_name(&device)
        );
    }
    let mut trainer = Trainer::new(config, varmap.clone(), optimizer, device.clone());
    let report = trainer.fit(&model, &train_set, Some(&eval_set))?;

    // The best epoch's weights (by eval accuracy) become the saved model.
    trainer.restore_best()?;
    let metrics = trainer.evaluate(&model, &eval_set)?;
    // What transformers' Auto classes read to pick the architecture.
    cfg.model_type = Some("bert".into());
    cfg.extra.insert("architectures".into(), serde_json::json!(["BertForSequenceClassification"]));
    hub::save_pretrained(&output, &cfg, &checkpoint::varmap_tensors(&varmap)?, Some(&files.dir))?;
    let summary = serde_json::json!({
        "eval_accuracy": metrics["accuracy"],
        "eval_loss": metrics["loss"],
        "eval_f1": metrics.get("f1"),
        "train_samples_per_s": report.samples_per_s,
        "seconds": report.train_seconds,
        "steps": report.steps,
        "train_examples": train_set.len(),
        "eval_examples": eval_set.len(),
        "best_step": report.best.map(|b| b.0),
        "output": output,
        "device": wick::device::device_name(&device),
    });
    if args.run.json {
        println!("{summary}");
    } else {
        eprintln!(
            "eval accuracy {:.4} (loss {:.4}) after {} steps, {:.0} s, {:.1} texts/s; model saved to {}",
            metrics["accuracy"],
            metrics["loss"],
            report.steps,
            report.train_seconds,
            report.samples_per_s,
            output.display()
        );
    }
    Ok(())
}

fn predict(args: PredictArgs) -> Result<()> {
    let device = wick::device::device(&args.device)?;
    let dtype = wick::device::parse_dtype(&args.dtype)?;
    let files = args.model.resolve()?;
    let cfg: bert::Config = files.config()?;
    let tokenizer = files.tokenizer()?;
    let max_len = args.max_len.unwrap_or(cfg.max_position_embeddings);
    let weights = bert::canonical_names(files.load_tensors(&device)?, true);
    if !weights.contains_key("classifier.weight") {
        bail!("{} has no classifier head (classifier.weight): fine-tune it with `bert_finetune train` first", args.model.model);
    }
    let model = BertForSequenceClassification::load(hub::inference_var_builder(weights, dtype, &device), &cfg)?;
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let batch = wick::tokenizer::encode_batch(&tokenizer, &texts, max_len, cfg.pad_token_id, &device)?;
    if batch.truncated > 0 {
        eprintln!("note: {} text(s) cut to {max_len} tokens", batch.truncated);
    }
    let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&batch.token_type_ids), false)?.to_dtype(DType::F32)?;
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let names = cfg.labels();
    let ids = wick::nn::argmax_last(&logits)?;
    let labels: Vec<&str> = ids.iter().map(|&i| names[i as usize].as_str()).collect();
    let (probs, logits) = (probs.to_vec2::<f32>()?, logits.to_vec2::<f32>()?);
    if args.json {
        println!("{}", serde_json::json!({ "labels": labels, "probs": probs, "logits": logits }));
    } else {
        for ((text, label), (p, id)) in texts.iter().zip(&labels).zip(probs.iter().zip(&ids)) {
            println!("{label}\t{:.3}\t{text}", p[*id as usize]);
        }
    }
    Ok(())
}

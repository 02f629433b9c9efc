//! `wick finetune`: fine-tune a BERT-family checkpoint on labelled texts or sentence pairs and
//! save the best evaluation's weights as a Hugging Face folder.
//!
//! - Classification (SST-2, MRPC, QNLI, RTE, MNLI, ...): a head with one logit per label seen
//!   in the training file, cross-entropy; accuracy (and F1 for two classes) picks the best
//!   evaluation.
//! - Regression (STS-B): one output, mean squared error; Pearson's correlation picks the best
//!   evaluation, Spearman's is reported beside it.
//!
//! The saved folder (`config.json` with `id2label`, or `problem_type: "regression"`;
//! `model.safetensors`; the tokenizer files) loads in transformers'
//! `AutoModelForSequenceClassification.from_pretrained` as the same classifier or regressor.

use crate::cli::{at_least_one, fraction, minutes, non_negative, positive, ModelArgs, OutputArgs, RunArgs};
use crate::data::text::{read_text_file, LabelSet, Targets, TextColumns, TextFile, TokenizedTexts};
use crate::data::Dataset;
use crate::models::bert::{self, BertForSequenceClassification};
use crate::pretrained::{self, Trainable};
use crate::train::{optim, MetricGoal, Metrics, OptimizerConfig, Schedule, Trainer, TrainerConfig};
use candle_nn::VarMap;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::path::PathBuf;
use std::time::Duration;

/// What the labels are.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Regression when the labels are numbers and not all integers (STS-B's scores), or when
    /// --model already is a regressor; classification otherwise.
    Auto,
    /// One class per distinct label.
    Classification,
    /// Numeric labels; one output trained with mean squared error.
    Regression,
}

/// Fine-tune a BERT-family model on labelled texts or sentence pairs (classification or
/// regression); the best evaluation's weights are saved to --output as a Hugging Face folder.
#[derive(clap::Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: .tsv, .csv or .jsonl with a header (or keys) naming a text column, an
    /// optional second text column for sentence pairs, and a label column (GLUE's files work
    /// as they are).
    #[arg(long)]
    pub train: PathBuf,
    /// Evaluation data, same format and columns; evaluated after every epoch.
    #[arg(long)]
    pub eval: PathBuf,
    #[command(flatten)]
    pub columns: TextColumns,
    /// Classification or regression.
    #[arg(long, value_enum, default_value_t = TaskKind::Auto)]
    pub task: TaskKind,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub epochs: usize,
    #[command(flatten)]
    pub flags: FineTuneFlags,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// The optimizer, schedule and size flags of fine-tuning: `wick finetune`'s, and those of
/// distillation and recovery after pruning.
#[derive(clap::Args, Clone, Debug)]
pub struct FineTuneFlags {
    /// Texts (or GPT-2 token windows) per optimizer step (before accumulation).
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Texts per evaluation batch.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub eval_batch_size: usize,
    /// Accumulate gradients over this many batches per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub grad_accum: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 5e-5, value_parser = positive)]
    pub lr: f64,
    /// Fraction (0 to 1) of the steps spent warming the learning rate up from 0; it then decays
    /// linearly to 0.
    #[arg(long, default_value_t = 0.1, value_parser = fraction)]
    pub warmup_ratio: f64,
    /// AdamW weight decay (not applied to biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.01, value_parser = non_negative)]
    pub weight_decay: f64,
    /// Clip the gradients' global norm to this value (0 = no clipping).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    pub max_grad_norm: f64,
    /// Tokens per text or pair, special tokens included; longer ones are cut (a pair from its
    /// longer text first). Default: 128, or the model's maximum if smaller. (GPT-2: tokens per
    /// training window, at most n_positions.)
    #[arg(long, value_parser = at_least_one)]
    pub max_len: Option<usize>,
    /// Use only the first N training rows.
    #[arg(long, value_parser = at_least_one)]
    pub max_train_examples: Option<usize>,
    /// Use only the first N evaluation rows.
    #[arg(long, value_parser = at_least_one)]
    pub max_eval_examples: Option<usize>,
    /// Also evaluate every N optimizer steps (besides each epoch's end).
    #[arg(long, value_parser = at_least_one)]
    pub eval_every: Option<usize>,
    /// Stop after this many minutes, saving a checkpoint (resume with --resume).
    #[arg(long, value_parser = minutes)]
    pub minutes: Option<Duration>,
}

impl FineTuneFlags {
    /// The trainer's settings for `epochs` (or `max_steps`) over `train_len` items: AdamW's
    /// linear warmup and decay, an evaluation and a checkpoint each epoch (the last one kept,
    /// besides the best by `goal`), on top of `--output`/`--resume`/`--seed`.
    pub fn trainer_config(&self, epochs: usize, max_steps: Option<usize>, goal: Option<MetricGoal>, train_len: usize, (run, out): (&RunArgs, &OutputArgs)) -> TrainerConfig {
        let mut config = TrainerConfig {
            epochs,
            max_steps,
            batch_size: self.batch_size,
            eval_batch_size: self.eval_batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            eval_every: self.eval_every,
            eval_each_epoch: true,
            save_each_epoch: true,
            keep_last: 1,
            goal,
            time_limit: self.minutes,
            log_every: 10,
            ..out.trainer_config(run)
        };
        let total = config.total_steps(train_len);
        config.schedule = Schedule::LinearWarmup { warmup: Schedule::warmup_steps(self.warmup_ratio, total) };
        config
    }

    /// AdamW over `varmap`'s variables with `--weight-decay` (none on biases and LayerNorms).
    pub fn optimizer(&self, varmap: &VarMap) -> Result<Box<dyn crate::train::Optimizer>> {
        OptimizerConfig::adamw(self.weight_decay).build(optim::params(varmap, optim::is_bias_or_norm))
    }
}

/// Runs `wick finetune`: with --json the last line of stdout is [`finetune`]'s summary.
pub fn run(args: FinetuneArgs) -> Result<()> {
    let (metrics, summary) = finetune(&args)?;
    if args.run.json {
        println!("{summary}");
    } else {
        let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        eprintln!(
            "eval {} after {} steps, {:.0} s, {:.1} texts/s; model saved to {}",
            shown.join(", "),
            summary["steps"],
            summary["seconds"].as_f64().unwrap_or(0.0),
            summary["train_samples_per_s"].as_f64().unwrap_or(0.0),
            summary["output"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Fine-tunes as `args` say, saves the model, and returns the saved weights' evaluation
/// metrics and the summary: `eval_<metric>` of the
/// saved weights (`eval_accuracy`, `eval_loss`, `eval_f1` for classification; `eval_loss`,
/// `eval_pearson`, `eval_spearman` for regression), `train_samples_per_s`, `seconds`, `steps`,
/// `train_examples`, `eval_examples`, `best_step`, `output`, `device`, `task`.
pub fn finetune(args: &FinetuneArgs) -> Result<(Metrics, serde_json::Value)> {
    let output = args.out.output.clone().context("finetune needs --output DIR: the fine-tuned model is saved there")?;
    if args.run.dtype != DType::F32 {
        bail!("--dtype {}: fine-tuning trains in f32 (f16/bf16 are for predict)", args.run.dtype.as_str());
    }
    let device = args.run.device()?;
    let files = resolve_bert(&args.model, args.run.json)?;
    let mut cfg: bert::Config = files.config()?;
    let tokenizer = files.tokenizer()?;
    let max_len = checked_max_len(args.flags.max_len, 128, &cfg)?;

    let read = |path: &PathBuf, limit: Option<usize>| -> Result<TextFile> {
        let mut file = read_text_file(path, &args.columns, true)?;
        file.truncate(limit);
        Ok(file)
    };
    let train_file = read(&args.train, args.flags.max_train_examples)?;
    let eval_file = read(&args.eval, args.flags.max_eval_examples)?;
    if train_file.columns.text_pair.is_some() != eval_file.columns.text_pair.is_some() {
        bail!(
            "{} has {:?} and {} has {:?}: both must be single texts or both sentence pairs (name the columns with --text-column/--text-pair-column)",
            args.train.display(),
            train_file.columns,
            args.eval.display(),
            eval_file.columns
        );
    }
    let regression = match args.task {
        TaskKind::Regression => true,
        TaskKind::Classification => false,
        TaskKind::Auto => train_file.labels_look_like_scores() || (cfg.is_regression() && train_file.scores().is_ok()),
    };
    // A new head (freshly initialised) when the checkpoint's does not fit the task or labels.
    let mut new_head: Option<String> = None;
    let (train_targets, eval_targets) = if regression {
        if !cfg.is_regression() {
            new_head = Some(format!("a regression head (the checkpoint's was trained for {})", head_of(&cfg)));
            cfg.set_regression();
        }
        (Targets::Scores(train_file.scores()?), Targets::Scores(eval_file.scores()?))
    } else {
        let labels = LabelSet::from_examples(&train_file.examples);
        if labels.len() < 2 {
            bail!("{}: only one label ({:?}) in the training rows; a classifier needs two or more (for numeric scores use --task regression)", args.train.display(), labels.names);
        }
        if cfg.is_regression() || cfg.labels() != labels.names {
            new_head = Some(format!("a new head for labels {:?} (the checkpoint's was trained for {})", labels.names, head_of(&cfg)));
            cfg.set_labels(&labels.names);
        }
        (Targets::Classes(train_file.class_ids(&labels)?), Targets::Classes(eval_file.class_ids(&labels).context("the evaluation labels must be among the training labels")?))
    };
    let pad = cfg.pad_token_id;
    let train_set = TokenizedTexts::new(&tokenizer, &train_file.examples, train_targets, max_len, pad).context("training data")?;
    let eval_set = TokenizedTexts::new(&tokenizer, &eval_file.examples, eval_targets, max_len, pad).context("evaluation data")?;

    let keep = |name: &str| new_head.is_none() || !name.starts_with("classifier.");
    let Trainable { model, varmap, report } = pretrained::load_trainable::<BertForSequenceClassification>(&files, &cfg, &device, args.run.seed, keep)?;
    if let (Some(what), true) = (&new_head, report.left_out.iter().any(|k| k.starts_with("classifier."))) {
        eprintln!("note: starting {what}");
    }
    if let Some(warning) = report.warning() {
        eprintln!("note: {warning}");
    }

    let goal = MetricGoal::maximize(if regression { "pearson" } else { "accuracy" });
    let config = args.flags.trainer_config(args.epochs, None, Some(goal), train_set.len(), (&args.run, &args.out));
    let total = config.total_steps(train_set.len());
    let optimizer = args.flags.optimizer(&varmap)?;
    if !args.run.json {
        let task = if regression { "regression".to_string() } else { format!("{} labels", cfg.num_labels()) };
        let what = if train_file.columns.text_pair.is_some() { "text pairs" } else { "texts" };
        eprintln!(
            "fine-tuning {} ({task}) on {} {what} (mean {:.1} tokens, {} cut at {max_len}), evaluating on {}; {total} steps on {}",
            args.model.model,
            train_set.len(),
            train_set.mean_len(),
            train_set.truncated,
            eval_set.len(),
            crate::device::device_name(&device)
        );
    }
    let mut trainer = Trainer::new(config, varmap.clone(), optimizer, device.clone());
    let report = trainer.fit(&model, &train_set, Some(&eval_set))?;

    // The best evaluation's weights become the saved model.
    trainer.restore_best()?;
    let metrics = trainer.evaluate(&model, &eval_set)?;
    if let Some(output) = args.out.model_dir() {
        pretrained::save_varmap::<BertForSequenceClassification>(output, &cfg, &varmap, Some(&files.dir))?;
    }
    let mut summary = serde_json::json!({
        "task": if regression { "regression" } else { "classification" },
        "train_samples_per_s": report.samples_per_s,
        "seconds": report.train_seconds,
        "steps": report.steps,
        "train_examples": train_set.len(),
        "eval_examples": eval_set.len(),
        "best_step": report.best.map(|b| b.0),
        "output": output,
        "device": crate::device::device_name(&device),
    });
    if !regression {
        // Present (null) for more than two classes too, as it always was.
        summary["eval_f1"] = serde_json::Value::Null;
    }
    for (name, value) in &metrics {
        summary[format!("eval_{name}")] = serde_json::json!(value);
    }
    Ok((metrics, summary))
}

/// The model's files, checked to be a BERT-family checkpoint.
pub(crate) fn resolve_bert(model: &ModelArgs, quiet: bool) -> Result<crate::weights::ModelFiles> {
    let files = model.resolve(quiet)?;
    files.check_model_type(&["bert"])?;
    Ok(files)
}

/// `--max-len`, or `default` capped at the model's maximum; longer than the model's position
/// embeddings is an error.
pub(crate) fn checked_max_len(asked: Option<usize>, default: usize, cfg: &bert::Config) -> Result<usize> {
    let limit = cfg.max_position_embeddings;
    match asked {
        Some(n) if n > limit => bail!("--max-len {n} is longer than this model allows (max_position_embeddings {limit})"),
        Some(n) => Ok(n),
        None => Ok(default.min(limit)),
    }
}

/// What the checkpoint's own head was trained for, for the note about replacing it.
fn head_of(cfg: &bert::Config) -> String {
    if cfg.is_regression() {
        "regression".to_string()
    } else {
        format!("labels {:?}", cfg.labels())
    }
}

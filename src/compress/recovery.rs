//! What `wick distill` and `wick prune` share: the training flags (as `wick finetune`'s for a
//! BERT classifier, as `wick train gpt2`'s data for a GPT-2 LM), each family's datasets, and one
//! fine-tuning run through the Trainer that restores the best evaluation's weights.

use super::distill::Distillable;
use super::Compressible;
use crate::cli::{at_least_one, fraction, minutes, non_negative, positive, OutputArgs, RunArgs};
use crate::data::chars::TokenWindows;
use crate::data::text::{read_text_file, LabelSet, Targets, TextColumns, TokenizedTexts};
use crate::data::Dataset;
use crate::models::bert::{self, BertForSequenceClassification};
use crate::models::gpt2::{self, GPT2LMHeadModel};
use crate::train::{optim, MetricGoal, Metrics, OptimizerConfig, Schedule, TrainModel, TrainReport, Trainer, TrainerConfig, UpdateHook};
use crate::weights::ModelFiles;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use std::path::PathBuf;
use std::time::Duration;

/// Training data and settings of distillation or of recovery fine-tuning after pruning.
#[derive(clap::Args, Clone, Debug)]
#[command(allow_negative_numbers = true)]
pub struct TrainingArgs {
    /// Training data. For a BERT classifier: .tsv, .csv or .jsonl with a text column (and an
    /// optional pair column) and a label column, as `wick finetune --train` reads them; labels
    /// must be among the model's. For GPT-2: a plain-text corpus whose last 10% is the
    /// validation set, as `wick train gpt2 --data` reads it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// BERT: evaluation data in the same format, evaluated after every epoch (the best
    /// evaluation's weights are saved). GPT-2 evaluates on the last 10% of --data.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub columns: TextColumns,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule spans them); default: --epochs worth.
    #[arg(long, value_parser = at_least_one)]
    pub max_steps: Option<usize>,
    /// Texts (or GPT-2 token windows) per optimizer step.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Texts per evaluation batch.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub eval_batch_size: usize,
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
    /// BERT: tokens per text or pair (default 128, or the model's maximum if smaller). GPT-2:
    /// tokens per training window (default 128, or n_positions if smaller).
    #[arg(long, value_parser = at_least_one)]
    pub max_len: Option<usize>,
    /// Use only the first N training rows (BERT).
    #[arg(long, value_parser = at_least_one)]
    pub max_train_examples: Option<usize>,
    /// Use only the first N evaluation rows (BERT).
    #[arg(long, value_parser = at_least_one)]
    pub max_eval_examples: Option<usize>,
    /// Also evaluate every N optimizer steps (besides each epoch's end).
    #[arg(long, value_parser = at_least_one)]
    pub eval_every: Option<usize>,
    /// Stop after this many minutes, saving a checkpoint (resume with --resume).
    #[arg(long, value_parser = minutes)]
    pub minutes: Option<Duration>,
}

/// A model family `wick distill` and `wick prune` handle: its datasets and what "best" means.
pub trait Family: Compressible + Distillable {
    type Data: Dataset<Batch = Self::Batch>;
    /// The training set of `args.data` and the evaluation set, if any, tokenized with the
    /// model's tokenizer (from `files`) for a model with `config`.
    fn datasets(args: &TrainingArgs, files: &ModelFiles, config: &Self::Config) -> Result<(Self::Data, Option<Self::Data>)>;
    /// The metric that picks the best evaluation.
    fn goal(config: &Self::Config) -> MetricGoal;
    /// Makes a fresh student's config fit its teacher (the same labels).
    fn match_teacher(_teacher: &Self::Config, _student: &mut Self::Config) {}
}

impl Family for BertForSequenceClassification {
    type Data = TokenizedTexts;
    fn datasets(args: &TrainingArgs, files: &ModelFiles, cfg: &bert::Config) -> Result<(TokenizedTexts, Option<TokenizedTexts>)> {
        let data = args.data.as_ref().context("training needs --data")?;
        let tokenizer = files.tokenizer()?;
        let max_len = crate::cmd::finetune::checked_max_len(args.max_len, 128, cfg)?;
        let labels = LabelSet { names: cfg.labels() };
        let read = |path: &PathBuf, limit: Option<usize>| -> Result<TokenizedTexts> {
            let mut file = read_text_file(path, &args.columns, true)?;
            file.truncate(limit);
            let targets = if cfg.is_regression() { Targets::Scores(file.scores()?) } else { Targets::Classes(file.class_ids(&labels)?) };
            TokenizedTexts::new(&tokenizer, &file.examples, targets, max_len, cfg.pad_token_id).with_context(|| format!("{}", path.display()))
        };
        let train = read(data, args.max_train_examples)?;
        let eval = args.eval.as_ref().map(|path| read(path, args.max_eval_examples)).transpose()?;
        Ok((train, eval))
    }
    fn goal(cfg: &bert::Config) -> MetricGoal {
        MetricGoal::maximize(if cfg.is_regression() { "pearson" } else { "accuracy" })
    }
    fn match_teacher(teacher: &bert::Config, student: &mut bert::Config) {
        student.id2label = teacher.id2label.clone();
        student.label2id = teacher.label2id.clone();
        student.extra.remove("num_labels");
        if let Some(problem) = teacher.extra.get("problem_type") {
            student.extra.insert("problem_type".into(), problem.clone());
        }
    }
}

impl Family for GPT2LMHeadModel {
    type Data = TokenWindows;
    fn datasets(args: &TrainingArgs, files: &ModelFiles, cfg: &gpt2::Config) -> Result<(TokenWindows, Option<TokenWindows>)> {
        let data = args.data.as_ref().context("training needs --data")?;
        if args.eval.is_some() {
            bail!("--eval is for BERT classifiers: a GPT-2 model evaluates on the last 10% of --data");
        }
        let block = match args.max_len {
            Some(n) if n > cfg.n_positions => bail!("--max-len {n} is longer than this model's n_positions ({})", cfg.n_positions),
            Some(n) => n,
            None => 128.min(cfg.n_positions),
        };
        let tokenizer = files.tokenizer()?;
        let text = std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
        let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", data.display()))?.get_ids().to_vec();
        let cut = ids.len() - ids.len() / 10;
        let too_short = |part: &str| format!("{}: the {part} is too short for windows of {block} tokens", data.display());
        let train = TokenWindows::new(ids[..cut].to_vec(), block).with_context(|| too_short("training part (90%)"))?;
        let val = TokenWindows::new(ids[cut..].to_vec(), block).with_context(|| too_short("validation part (10%)"))?;
        Ok((train, Some(val)))
    }
    fn goal(_: &gpt2::Config) -> MetricGoal {
        MetricGoal::minimize("loss")
    }
}

/// One training run of `model` (whose trainable variables are `varmap`) on `train`, evaluating
/// on `eval`; `after_update` runs after every optimizer step. The best evaluation's weights are
/// left in `varmap`; returns the report and their metrics (none without an evaluation set).
#[allow(clippy::too_many_arguments)]
pub fn fit<T: TrainModel, D: Dataset<Batch = T::Batch>>(
    model: &T,
    varmap: &VarMap,
    device: &Device,
    (train, eval): (&D, Option<&D>),
    goal: MetricGoal,
    args: &TrainingArgs,
    (run, out): (&RunArgs, &OutputArgs),
    after_update: Option<UpdateHook>,
) -> Result<(TrainReport, Option<Metrics>)> {
    let mut config = TrainerConfig {
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch_size: args.batch_size,
        eval_batch_size: args.eval_batch_size,
        lr: args.lr,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        eval_every: args.eval_every,
        eval_each_epoch: true,
        save_each_epoch: true,
        keep_last: 1,
        goal: eval.is_some().then_some(goal),
        time_limit: args.minutes,
        log_every: 10,
        ..out.trainer_config(run)
    };
    let total = config.total_steps(train.len());
    config.schedule = Schedule::LinearWarmup { warmup: Schedule::warmup_steps(args.warmup_ratio, total) };
    let optimizer = OptimizerConfig::adamw(args.weight_decay).build(optim::params(varmap, optim::is_bias_or_norm))?;
    let mut trainer = Trainer::new(config, varmap.clone(), optimizer, device.clone());
    trainer.after_update = after_update;
    let report = trainer.fit(model, train, eval)?;
    trainer.restore_best()?;
    let metrics = eval.map(|eval| trainer.evaluate(model, eval)).transpose()?;
    Ok((report, metrics))
}

/// Metrics of `model` on `data` (for the teacher, or a model before recovery).
pub fn evaluate<T: TrainModel, D: Dataset<Batch = T::Batch>>(model: &T, data: &D, batch_size: usize, device: &Device) -> Result<Metrics> {
    let config = TrainerConfig { eval_batch_size: batch_size, progress: false, ..Default::default() };
    let trainer = Trainer::new(config, VarMap::new(), OptimizerConfig::sgd().build(vec![])?, device.clone());
    trainer.evaluate(model, data)
}

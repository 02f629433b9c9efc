//! What `wick distill` and `wick prune` share: the training flags (as `wick finetune`'s for a
//! BERT classifier, as `wick train gpt2`'s data for a GPT-2 LM), each family's datasets, and one
//! fine-tuning run through the Trainer that restores the best evaluation's weights.

use super::distill::Distillable;
use super::Compressible;
use crate::cli::{at_least_one, OutputArgs, RunArgs};
use crate::cmd::finetune::FineTuneFlags;
use crate::data::chars::TokenWindows;
use crate::data::text::{read_text_file, LabelSet, Targets, TextColumns, TokenizedTexts};
use crate::data::Dataset;
use crate::models::bert::{self, BertForSequenceClassification};
use crate::models::gpt2::{self, GPT2LMHeadModel};
use crate::train::{MetricGoal, Metrics, OptimizerConfig, TrainModel, TrainReport, Trainer, TrainerConfig, UpdateHook};
use crate::weights::ModelFiles;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use std::path::PathBuf;

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
    #[command(flatten)]
    pub flags: FineTuneFlags,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

impl TrainingArgs {
    /// Prints a command's summary: one JSON line on stdout with --json, else readable on stderr.
    pub fn print_summary(&self, summary: &serde_json::Value) -> Result<()> {
        if self.run.json {
            println!("{summary}");
        } else {
            eprintln!("{}", serde_json::to_string_pretty(summary)?);
        }
        Ok(())
    }
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
        let max_len = crate::cmd::finetune::checked_max_len(args.flags.max_len, 128, cfg)?;
        let labels = LabelSet { names: cfg.labels() };
        let read = |path: &PathBuf, limit: Option<usize>| -> Result<TokenizedTexts> {
            let mut file = read_text_file(path, &args.columns, true)?;
            file.truncate(limit);
            let targets = if cfg.is_regression() { Targets::Scores(file.scores()?) } else { Targets::Classes(file.class_ids(&labels)?) };
            TokenizedTexts::new(&tokenizer, &file.examples, targets, max_len, cfg.pad_token_id).with_context(|| format!("{}", path.display()))
        };
        let train = read(data, args.flags.max_train_examples)?;
        let eval = args.eval.as_ref().map(|path| read(path, args.flags.max_eval_examples)).transpose()?;
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
        let block = match args.flags.max_len {
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
    after_update: Option<UpdateHook>,
) -> Result<(TrainReport, Option<Metrics>)> {
    let config = args.flags.trainer_config(args.epochs, args.max_steps, eval.is_some().then_some(goal), train.len(), (&args.run, &args.out));
    let optimizer = args.flags.optimizer(varmap)?;
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

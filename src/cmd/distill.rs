//! `wick distill`: train a smaller student from a teacher (a fine-tuned BERT classifier, or a
//! GPT-2 LM) with [`crate::compress::distill`]'s loss, and save the student as a Hugging Face
//! folder (the teacher's tokenizer files copied) that `wick predict`/`wick generate` and
//! transformers load.

use crate::cli::{at_least_one, fraction, non_negative, positive, ModelArgs};
use crate::compress::distill::{DistillConfig, Distillation};
use crate::compress::recovery::{self, Family, TrainingArgs};
use crate::compress::{layers, weight_stats, Checkpoint};
use crate::models::bert::BertForSequenceClassification;
use crate::models::gpt2::GPT2LMHeadModel;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use clap::ArgGroup;
use std::path::PathBuf;

/// Distil a fine-tuned BERT classifier or a GPT-2 language model into a smaller student
/// (some of the teacher's layers, or a fresh model from a smaller config) and save the student
/// as a Hugging Face folder in --output.
#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("student").required(true).args(["student_layers", "student_config"])))]
pub struct DistillArgs {
    /// The teacher: a Hub repo id or a model folder (a BERT classifier or a GPT-2 LM).
    #[arg(long, value_name = "ID|DIR")]
    pub teacher: String,
    /// A student made of this many of the teacher's layers, spread evenly from the first
    /// (every other layer for half of them, as DistilBERT).
    #[arg(long, value_parser = at_least_one)]
    pub student_layers: Option<usize>,
    /// A student freshly initialised from this config.json (same family and vocabulary as the
    /// teacher; a BERT student takes the teacher's labels).
    #[arg(long)]
    pub student_config: Option<PathBuf>,
    /// Weight α of the teacher's soft targets; 1 − α weighs the labels' cross-entropy.
    #[arg(long, default_value_t = 0.5, value_parser = fraction)]
    pub alpha: f64,
    /// Softmax temperature T of the soft targets (the KL term is scaled by T²).
    #[arg(long, default_value_t = 2.0, value_parser = positive)]
    pub temperature: f64,
    /// Weight of a cosine loss between the student's and teacher's last hidden states (BERT,
    /// same hidden size; 0 = off).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub cosine: f64,
    /// Compute each training row's teacher logits once and reuse them in later epochs (exact:
    /// the teacher runs without dropout and the inputs are not augmented; classifiers only,
    /// not with --cosine).
    #[arg(long)]
    pub cache_teacher: bool,
    #[command(flatten)]
    pub training: TrainingArgs,
}

pub fn run(args: DistillArgs) -> Result<()> {
    args.training.print_summary(&distill(&args)?)
}

/// Distils as `args` say and saves the student; returns a summary: the teacher's and the
/// student's parameters and evaluation metrics (`teacher_eval_<metric>`, `eval_<metric>`),
/// steps, seconds, `output`.
pub fn distill(args: &DistillArgs) -> Result<serde_json::Value> {
    let files = ModelArgs::new(args.teacher.clone()).resolve(args.training.run.json)?;
    match files.model_type()?.as_deref() {
        Some("bert") => distill_family::<BertForSequenceClassification>(args, &files),
        Some("gpt2") => distill_family::<GPT2LMHeadModel>(args, &files),
        other => bail!("{}: wick distill handles BERT classifiers and GPT-2 models, not model_type {other:?}", files.dir.display()),
    }
}

fn distill_family<M: Family>(args: &DistillArgs, files: &crate::weights::ModelFiles) -> Result<serde_json::Value> {
    let output = args.training.out.output.clone().context("distill needs --output DIR: the student is saved there")?;
    let device = args.training.run.training_device()?;
    let config = DistillConfig { alpha: args.alpha, temperature: args.temperature, cosine: args.cosine, cache_teacher: args.cache_teacher };
    config.check()?;
    let teacher_ckpt = Checkpoint::<M>::read(files, &device)?;
    let (student_config, student_tensors, student_varmap, student) = match (args.student_layers, &args.student_config) {
        (Some(n), _) => {
            let keep = layers::spread_evenly(M::num_layers(&teacher_ckpt.config), n).context("--student-layers")?;
            let ckpt = layers::keep_layers(&teacher_ckpt, &keep)?;
            let (model, varmap) = ckpt.trainable(&device)?;
            (ckpt.config, format!("layers {keep:?} of the teacher"), varmap, model)
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --student-config {}", path.display()))?;
            let mut cfg: M::Config = serde_json::from_str(&text).with_context(|| format!("--student-config {} is not a {} config", path.display(), M::ARCHITECTURE))?;
            M::match_teacher(&teacher_ckpt.config, &mut cfg);
            let varmap = VarMap::new();
            let model = M::build(crate::nn::var_builder(&varmap, DType::F32, &device, args.training.run.seed), &cfg).with_context(|| format!("building the student of {}", path.display()))?;
            (cfg, format!("fresh from {}", path.display()), varmap, model)
        }
        (None, None) => bail!("give --student-layers or --student-config"),
    };
    let (train, eval) = M::datasets(&args.training, files, &teacher_ckpt.config)?;
    let teacher = teacher_ckpt.model(&device)?;
    let mut summary = serde_json::json!({ "student": student_tensors, "output": output });
    if let Some(eval) = &eval {
        for (k, v) in recovery::evaluate(&teacher, eval, args.training.flags.eval_batch_size, &device)? {
            summary[format!("teacher_eval_{k}")] = v.into();
        }
    }
    let distillation = Distillation::new(student, teacher, config)?;
    let goal = M::goal(&student_config);
    let (report, metrics) = recovery::fit(&distillation, &student_varmap, &device, (&train, eval.as_ref()), goal, &args.training, None)?;
    let student = Checkpoint::<M> { config: student_config, tensors: crate::train::checkpoint::varmap_tensors(&student_varmap)? };
    student.save(&output, Some(&files.dir))?;
    summary["teacher_parameters"] = (weight_stats(&teacher_ckpt.tensors)?.0 / 4).into();
    summary["student_parameters"] = (weight_stats(&student.tensors)?.0 / 4).into();
    summary["steps"] = report.steps.into();
    summary["seconds"] = report.train_seconds.into();
    summary["train_samples_per_s"] = report.samples_per_s.into();
    summary["cached_teacher_rows"] = distillation.cached_rows().into();
    for (k, v) in metrics.unwrap_or_default() {
        summary[format!("eval_{k}")] = v.into();
    }
    Ok(summary)
}

//! The one training loop every wick model uses.
//!
//! A model implements [`TrainModel`] (a loss from a batch, evaluation outputs); data comes from a
//! [`Dataset`]; the [`Trainer`] does the rest: seeded shuffling, gradient accumulation and
//! clipping, the optimizer and LR schedule, evaluation with metrics, checkpoints with resume,
//! early stopping, a progress bar, a JSON-lines metrics log and a loss-curve picture.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tasks;

pub use checkpoint::TrainerState;
pub use metrics::{EvalBatch, Metrics, Task};
pub use optim::{Optimizer, OptimizerConfig, Param};
pub use schedule::Schedule;

use crate::data::{Batching, Dataset};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the trainer needs from a model.
pub trait TrainModel {
    type Batch;
    fn task(&self) -> Task;
    /// The mean loss over the batch, a scalar. `train` turns on dropout and batch statistics.
    fn loss(&self, batch: &Self::Batch, train: bool) -> Result<Tensor>;
    /// The batch's contribution to an evaluation (in evaluation mode).
    fn evaluate(&self, batch: &Self::Batch) -> Result<EvalBatch>;
}

/// Which evaluation metric decides the best checkpoint and early stopping.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricGoal {
    /// A key of [`Metrics`]: `loss`, `accuracy`, `f1`, `perplexity`.
    pub metric: String,
    pub higher_is_better: bool,
}

impl MetricGoal {
    pub fn maximize(metric: &str) -> Self {
        Self { metric: metric.into(), higher_is_better: true }
    }
    pub fn minimize(metric: &str) -> Self {
        Self { metric: metric.into(), higher_is_better: false }
    }
    fn improves(&self, value: f64, best: Option<f64>) -> bool {
        match best {
            None => true,
            Some(b) if self.higher_is_better => value > b,
            Some(b) => value < b,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainerConfig {
    pub epochs: usize,
    /// Total optimizer steps; the schedule spans them. Default: `epochs` worth.
    pub max_steps: Option<usize>,
    /// Stop (with a checkpoint, ready to resume) after this many steps or this much training
    /// time, as if interrupted: the schedule still spans the whole run.
    pub halt_at_step: Option<usize>,
    pub time_limit: Option<Duration>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub drop_last: bool,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub max_grad_norm: Option<f64>,
    pub eval_every: Option<usize>,
    pub eval_each_epoch: bool,
    pub max_eval_batches: Option<usize>,
    pub log_every: usize,
    pub seed: u64,
    /// Checkpoints, `metrics.jsonl` and `loss_curve.svg` go here; nothing is written without it.
    pub output_dir: Option<PathBuf>,
    pub save_every: Option<usize>,
    pub save_each_epoch: bool,
    pub keep_last: usize,
    pub goal: Option<MetricGoal>,
    pub early_stopping_patience: Option<usize>,
    /// Continue from the newest checkpoint in `output_dir`, if there is one.
    pub resume: bool,
    pub progress: bool,
}

impl TrainerConfig {
    /// Optimizer steps a run over `train_len` items takes (what the LR schedule spans).
    pub fn total_steps(&self, train_len: usize) -> usize {
        // batch_size 0 is refused by `fit` with a clear error; here it must not divide by zero.
        let plan = Batching { batch_size: self.batch_size.max(1), shuffle: true, drop_last: self.drop_last, seed: self.seed };
        let steps_per_epoch = plan.batches_per_epoch(train_len).div_ceil(self.grad_accum.max(1));
        self.max_steps.unwrap_or_else(|| self.epochs.saturating_mul(steps_per_epoch))
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            halt_at_step: None,
            time_limit: None,
            batch_size: 32,
            eval_batch_size: 256,
            drop_last: false,
            grad_accum: 1,
            lr: 1e-3,
            schedule: Schedule::Constant,
            max_grad_norm: None,
            eval_every: None,
            eval_each_epoch: true,
            max_eval_batches: None,
            log_every: 10,
            seed: 0,
            output_dir: None,
            save_every: None,
            save_each_epoch: true,
            keep_last: 2,
            goal: None,
            early_stopping_patience: None,
            resume: false,
            progress: true,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    /// Loss of every optimizer step run in this call, by step number (1-based).
    pub train_losses: Vec<(usize, f64)>,
    pub evals: Vec<(usize, Metrics)>,
    pub steps: usize,
    pub epochs_completed: usize,
    pub samples: u64,
    pub train_seconds: f64,
    pub samples_per_s: f64,
    pub best: Option<(usize, f64)>,
    pub best_checkpoint: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    pub stopped_early: bool,
    pub halted: bool,
    pub resumed_from: Option<usize>,
}

impl TrainReport {
    pub fn last_eval(&self) -> Option<&Metrics> {
        self.evals.last().map(|(_, m)| m)
    }
}

pub struct Trainer {
    pub config: TrainerConfig,
    pub varmap: VarMap,
    pub optimizer: Box<dyn Optimizer>,
    pub device: Device,
}

impl Trainer {
    pub fn new(config: TrainerConfig, varmap: VarMap, optimizer: Box<dyn Optimizer>, device: Device) -> Self {
        Self { config, varmap, optimizer, device }
    }

    /// Trains `model` on `train`, evaluating on `eval` when given. `samples_per_s` in the report
    /// counts the time of optimizer steps only.
    pub fn fit<M, D>(&mut self, model: &M, train: &D, eval: Option<&D>) -> Result<TrainReport>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let cfg = self.config.clone();
        let zero = [("batch_size", Some(cfg.batch_size)), ("eval_batch_size", Some(cfg.eval_batch_size)), ("grad_accum", Some(cfg.grad_accum)),
            ("log_every", Some(cfg.log_every)), ("eval_every", cfg.eval_every), ("save_every", cfg.save_every)];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == Some(0)) {
            bail!("{name} must be at least 1");
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", cfg.lr);
        }
        if train.is_empty() {
            bail!("the training set is empty");
        }
        if eval.is_some_and(|e| e.is_empty()) {
            bail!("the evaluation set is empty");
        }
        let plan = Batching { batch_size: cfg.batch_size, shuffle: true, drop_last: cfg.drop_last, seed: cfg.seed };
        let batches_per_epoch = plan.batches_per_epoch(train.len());
        if batches_per_epoch == 0 {
            bail!("the training set ({} items) is smaller than one batch of {} with drop_last", train.len(), cfg.batch_size);
        }
        let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum);
        let total_steps = cfg.total_steps(train.len());
        if total_steps == 0 {
            bail!("nothing to train: 0 epochs / 0 steps");
        }

        let mut state = TrainerState { seed: cfg.seed, ..Default::default() };
        let mut report = TrainReport::default();
        if let (Some(out), false) = (cfg.output_dir.as_deref(), cfg.resume) {
            // A new run would prune the old run's checkpoints and mix its curve into the log.
            if let Some((step, _)) = checkpoint::list(out)?.last() {
                bail!("{} already holds checkpoints (up to step {step}): resume from them, or choose another output folder", out.display());
            }
        }
        if cfg.resume {
            let out = cfg.output_dir.as_deref().context("resume needs an output directory")?;
            if let Some(dir) = checkpoint::latest(out)? {
                state = checkpoint::load(&dir, &self.varmap, self.optimizer.as_mut())?;
                if state.seed != cfg.seed {
                    bail!("{} was trained with seed {}, this run asks for {}", dir.display(), state.seed, cfg.seed);
                }
                report.resumed_from = Some(state.step);
                report.last_checkpoint = Some(dir);
            }
        }
        let mut log = MetricsLog::open(cfg.output_dir.as_deref(), report.resumed_from)?;
        let bar = progress_bar(cfg.progress, total_steps, state.step);
        if let Some(step) = report.resumed_from {
            bar.println(format!("resumed from step {step} (epoch {})", state.epoch));
        }

        let started = Instant::now();
        let time_before = state.train_seconds;
        let mut last_eval_step = None;
        // Time spent in optimizer steps only (not evaluation or checkpoints), for samples/s.
        let (mut train_time, mut samples_this_call) = (Duration::ZERO, 0u64);
        let mut window = (0u64, Instant::now());
        let patience_spent = |s: &TrainerState| cfg.early_stopping_patience.is_some_and(|p| s.evals_since_best >= p);
        // A resumed run that had already stopped early stays stopped.
        report.stopped_early = patience_spent(&state);
        'training: while state.step < total_steps && !report.stopped_early {
            let epoch = state.step / steps_per_epoch;
            let batches = plan.epoch(train.len(), epoch)?;
            let groups: Vec<&[Vec<usize>]> = batches.chunks(cfg.grad_accum).collect();
            for group in &groups[state.step % steps_per_epoch..] {
                let step_started = Instant::now();
                crate::nn::reseed(&self.device, cfg.seed, state.step as u64)?;
                let n_items: usize = group.iter().map(Vec::len).sum();
                let (loss, mut grads) = self.accumulate(model, train, group, n_items)?;
                if !loss.is_finite() {
                    let kept = report.last_checkpoint.as_ref().map(|p| format!("; the last good checkpoint is {}", p.display())).unwrap_or_default();
                    bail!("loss is {loss} at step {} (epoch {}): training stopped{kept}", state.step + 1, epoch + 1);
                }
                let grad_norm = optim::clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
                let lr = cfg.lr * cfg.schedule.factor(state.step, total_steps);
                self.optimizer.step(&grads, lr)?;
                state.step += 1;
                state.samples_seen += n_items as u64;
                samples_this_call += n_items as u64;
                train_time += step_started.elapsed();
                window.0 += n_items as u64;
                report.train_losses.push((state.step, loss));
                bar.set_position(state.step as u64);

                if state.step % cfg.log_every == 0 || state.step == total_steps {
                    let rate = window.0 as f64 / window.1.elapsed().as_secs_f64().max(1e-9);
                    window = (0, Instant::now());
                    bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {rate:.0} samples/s"));
                    log.write(serde_json::json!({"type": "train", "step": state.step, "epoch": epoch + 1, "loss": loss,
                        "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate}))?;
                }
                let epoch_done = state.step % steps_per_epoch == 0;
                if epoch_done {
                    state.epoch = epoch + 1;
                }
                state.train_seconds = time_before + started.elapsed().as_secs_f64();
                let wants_eval = cfg.eval_every.is_some_and(|n| state.step % n == 0) || (epoch_done && cfg.eval_each_epoch);
                let mut improved = false;
                if let (Some(eval), true) = (eval, wants_eval) {
                    let t = Instant::now();
                    let metrics = self.evaluate(model, eval)?;
                    last_eval_step = Some(state.step);
                    improved = self.track_best(&mut state, &metrics)?;
                    let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("eval_{k} {v:.4}")).collect();
                    bar.println(format!("step {} epoch {}: {}", state.step, epoch + 1, shown.join(" ")));
                    log.write_eval(state.step, epoch + 1, &metrics)?;
                    report.evals.push((state.step, metrics));
                    window.1 += t.elapsed();
                }
                let halt = cfg.halt_at_step.is_some_and(|h| state.step >= h)
                    || cfg.time_limit.is_some_and(|t| started.elapsed() >= t);
                let stop_early = patience_spent(&state);
                let wants_save = improved
                    || cfg.save_every.is_some_and(|n| state.step % n == 0)
                    || (epoch_done && cfg.save_each_epoch)
                    || halt
                    || stop_early
                    || state.step == total_steps;
                if let (Some(out), true) = (cfg.output_dir.as_deref(), wants_save) {
                    let t = Instant::now();
                    let dir = checkpoint::save(out, &self.varmap, self.optimizer.as_ref(), &state)?;
                    checkpoint::prune(out, cfg.keep_last, state.best_step)?;
                    report.last_checkpoint = Some(dir);
                    window.1 += t.elapsed();
                }
                if stop_early {
                    bar.println(format!("early stopping at step {}: no better {} for {} evaluations", state.step, cfg.goal.as_ref().map_or("metric", |g| g.metric.as_str()), state.evals_since_best));
                    report.stopped_early = true;
                    break 'training;
                }
                if halt {
                    report.halted = true;
                    break 'training;
                }
                if state.step >= total_steps {
                    break 'training;
                }
            }
        }
        bar.finish_and_clear();
        // An evaluation of the final weights, unless the last step was just evaluated (logged
        // once: a resumed run that had finished finds it in the log already).
        if let (Some(eval), false) = (eval, last_eval_step == Some(state.step) || report.halted) {
            let metrics = self.evaluate(model, eval)?;
            if log.last_eval_step != Some(state.step) {
                log.write_eval(state.step, state.epoch, &metrics)?;
            }
            report.evals.push((state.step, metrics));
        }
        report.steps = state.step;
        report.epochs_completed = state.epoch;
        report.samples = samples_this_call;
        report.train_seconds = train_time.as_secs_f64();
        report.samples_per_s = samples_this_call as f64 / report.train_seconds.max(1e-9);
        report.best = state.best_step.zip(state.best_metric);
        if let (Some(out), Some(step)) = (cfg.output_dir.as_deref(), state.best_step) {
            report.best_checkpoint = checkpoint::list(out)?.into_iter().find(|(s, _)| *s == step).map(|(_, p)| p);
        }
        if let Some(out) = cfg.output_dir.as_deref() {
            log.plot(&out.join("loss_curve.svg"))?;
        }
        Ok(report)
    }

    /// Runs the micro-batches of one optimizer step; returns the mean loss and the gradients of
    /// the optimizer's parameters, weighted so the step equals one on the whole group.
    fn accumulate<M, D>(&self, model: &M, data: &D, group: &[Vec<usize>], n_items: usize) -> Result<(f64, Vec<Option<Tensor>>)>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let params = self.optimizer.params();
        let mut total: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0.0;
        for indices in group {
            let batch = data.batch(indices, &self.device)?;
            let loss = model.loss(&batch, true)?;
            let weight = indices.len() as f64 / n_items as f64;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * weight;
            let loss = if group.len() > 1 { (loss * weight)? } else { loss };
            let store = loss.backward()?;
            for (acc, g) in total.iter_mut().zip(optim::grads_of(params, &store)) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
        }
        Ok((loss_sum, total))
    }

    /// Metrics of `model` on `data`, in evaluation mode.
    pub fn evaluate<M, D>(&self, model: &M, data: &D) -> Result<Metrics>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let batches = Batching::sequential(self.config.eval_batch_size).epoch(data.len(), 0)?;
        let n = self.config.max_eval_batches.unwrap_or(usize::MAX);
        let outputs = batches.iter().take(n).map(|idx| model.evaluate(&data.batch(idx, &self.device)?)).collect::<Result<Vec<_>>>()?;
        Ok(metrics::summarize(model.task(), &outputs))
    }

    /// Updates the best metric after an evaluation; true when this one is the new best.
    fn track_best(&self, state: &mut TrainerState, metrics: &Metrics) -> Result<bool> {
        let Some(goal) = &self.config.goal else { return Ok(false) };
        let value = *metrics.get(&goal.metric).with_context(|| format!("evaluation has no metric {:?} (it has {:?})", goal.metric, metrics.keys()))?;
        if goal.improves(value, state.best_metric) {
            state.best_metric = Some(value);
            state.best_step = Some(state.step);
            state.evals_since_best = 0;
            Ok(true)
        } else {
            state.evals_since_best += 1;
            Ok(false)
        }
    }
}

fn progress_bar(show: bool, total: usize, position: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total as u64), if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(position as u64);
    bar
}

/// `metrics.jsonl` in the output folder: one JSON object a line, kept across resumes.
struct MetricsLog {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    last_eval_step: Option<usize>,
}

impl MetricsLog {
    /// Opens the log for appending; after a resume from step `s`, records past `s` (written
    /// after that checkpoint by the interrupted run) are dropped so the curve stays one curve.
    fn open(output: Option<&Path>, resumed_from: Option<usize>) -> Result<Self> {
        let Some(out) = output else { return Ok(Self { path: None, file: None, last_eval_step: None }) };
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join("metrics.jsonl");
        let kept: String = match (resumed_from, std::fs::read_to_string(&path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= step))
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        let last_eval_step = kept
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "eval")
            .filter_map(|v| v["step"].as_u64())
            .last()
            .map(|s| s as usize);
        std::fs::write(&path, &kept).with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Self { path: Some(path), file: Some(file), last_eval_step })
    }

    fn write(&mut self, record: serde_json::Value) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{record}")?;
        }
        Ok(())
    }

    /// An evaluation record: `eval_loss`, `eval_accuracy`, ... at `step`.
    fn write_eval(&mut self, step: usize, epoch: usize, metrics: &Metrics) -> Result<()> {
        self.last_eval_step = Some(step);
        let mut record = serde_json::json!({"type": "eval", "step": step, "epoch": epoch});
        for (k, v) in metrics {
            record[format!("eval_{k}")] = (*v).into();
        }
        self.write(record)
    }

    fn plot(&self, svg: &Path) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let (mut train, mut eval) = (vec![], vec![]);
        for line in std::fs::read_to_string(path)?.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let step = v["step"].as_u64().unwrap_or(0) as usize;
            match (v["type"].as_str(), v["loss"].as_f64(), v["eval_loss"].as_f64()) {
                (Some("train"), Some(l), _) => train.push((step, l)),
                (Some("eval"), _, Some(l)) => eval.push((step, l)),
                _ => {}
            }
        }
        plot::loss_curve(svg, "wick training", &train, &eval)
    }
}

//! The one training loop every wick model uses.
//!
//! A model implements [`TrainModel`] (a loss from a batch, evaluation outputs); data comes from a
//! [`Dataset`]; the [`Trainer`] does the rest: seeded shuffling, gradient accumulation and
//! clipping, the optimizer and LR schedule, evaluation with metrics, checkpoints with resume,
//! early stopping, a progress bar, a JSON-lines metrics log and a loss-curve picture.
//!
//! [`Trainer::fit`] is a loop over optimizer steps whose pieces each have one job: the settings
//! are checked first ([`TrainerConfig::validate`]), a call starts a new run or resumes one
//! (`start`), each step trains (`train_step`: loss, gradient and divergence checks, the update),
//! then evaluates, saves and decides whether to stop (`after_step`, with [`BestSoFar`] for the
//! best checkpoint and early stopping, and `save_checkpoint`), and `finish` writes the report.
//!
//! With several processes (`mpirun`, see [`crate::dist`]) each rank trains on its share of
//! every batch, the gradients are summed across ranks before clipping and the update, and rank
//! 0 alone writes; with one (the default) nothing of that runs.
//!
//! A run never ends `Ok` with weights that went NaN or infinite, or that diverged by
//! [`guard::LossWatch`]'s rule: the loss and gradient norm of every step are checked, every
//! evaluation's metrics are, and the weights are before each checkpoint and at the end (which
//! covers the last update, whose result no later loss sees).

pub mod best;
pub mod checkpoint;
pub mod config;
pub mod guard;
mod log;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tasks;

pub use best::{BestSoFar, MetricGoal};
pub use checkpoint::TrainerState;
pub use config::TrainerConfig;
pub use metrics::{EvalBatch, Metrics, Task};
pub use optim::{Optimizer, OptimizerConfig, Param};
pub use schedule::Schedule;

use crate::data::{Batching, Dataset};
use crate::dist::{self, Collective};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use checkpoint::DataOrder;
use config::Plan;
use indicatif::ProgressBar;
use log::MetricsLog;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Runs after every optimizer update and after a resume has restored the weights: pruning
    /// re-applies its masks here, so that pruned weights stay exactly zero.
    pub after_update: Option<UpdateHook>,
    /// The processes training together: [`dist::world`] when the trainer is made.
    pub world: Arc<dyn Collective>,
}

/// See [`Trainer::after_update`].
pub type UpdateHook = Box<dyn Fn(&VarMap) -> Result<()>>;

/// One call of [`Trainer::fit`] in progress: the trainer's state and what the call reports,
/// logs and shows.
struct Run {
    state: TrainerState,
    report: TrainReport,
    log: MetricsLog,
    bar: ProgressBar,
    started: Instant,
    /// Training time of the run this call resumes.
    seconds_before: f64,
    /// Time spent in optimizer steps only (not evaluation or checkpoints), for samples/s.
    train_time: Duration,
    /// Items and start of the current logging window (evaluations and saves excluded).
    window: (u64, Instant),
    last_eval_step: Option<usize>,
    /// The step after which the weights were last checked finite.
    weights_checked_at: Option<usize>,
}

impl Run {
    /// The error that stops training for `what`, pointing at the last checkpoint kept.
    fn stopped(&self, what: String) -> anyhow::Error {
        let kept = self.report.last_checkpoint.as_ref().map(|p| format!("; the last good checkpoint is {}", p.display())).unwrap_or_default();
        anyhow!("{what}: training stopped{kept}. To avoid this, {}", guard::ADVICE)
    }
}

/// What one optimizer step did.
struct StepOutcome {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    /// The epoch the step belongs to (0-based).
    epoch: usize,
}

impl Trainer {
    pub fn new(config: TrainerConfig, varmap: VarMap, optimizer: Box<dyn Optimizer>, device: Device) -> Self {
        Self { config, varmap, optimizer, device, after_update: None, world: dist::world() }
    }

    /// Trains `model` on `train`, evaluating on `eval` when given. `samples_per_s` in the report
    /// counts the time of optimizer steps only.
    pub fn fit<M, D>(&mut self, model: &M, train: &D, eval: Option<&D>) -> Result<TrainReport>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        self.config.validate(model.task(), eval.is_some())?;
        if eval.is_some_and(|e| e.is_empty()) {
            bail!("the evaluation set is empty");
        }
        let plan = self.config.plan(train.len())?;
        let mut run = self.start(&plan, train.len())?;
        // A resumed run that had already stopped early stays stopped.
        run.report.stopped_early = run.state.best.patience_spent(self.config.early_stopping_patience);
        'training: while run.state.step < plan.total_steps && !run.report.stopped_early {
            let epoch = run.state.step / plan.steps_per_epoch;
            let batches = plan.batching.epoch(train.len(), epoch)?;
            let groups: Vec<&[Vec<usize>]> = batches.chunks(self.config.grad_accum).collect();
            for group in &groups[run.state.step % plan.steps_per_epoch..] {
                let done = self.train_step(model, train, group, epoch, plan.total_steps, &mut run)?;
                if self.after_step(model, eval, &plan, done, &mut run)? {
                    break 'training;
                }
            }
        }
        self.finish(model, eval, run)
    }

    /// A new run (refusing an output folder that holds an earlier run's checkpoints), or, with
    /// `config.resume`, the newest checkpoint's run.
    fn start(&mut self, plan: &Plan, train_len: usize) -> Result<Run> {
        self.world = dist::for_device(self.world.clone(), &self.device)?;
        let cfg = &self.config;
        let order = DataOrder::of(cfg, train_len, self.world.world_size());
        let mut report = TrainReport::default();
        let state = match (cfg.output_dir.as_deref(), cfg.resume) {
            (None, true) => bail!("resume needs an output directory"),
            (Some(out), true) => {
                let dir = checkpoint::latest(out)?.with_context(|| {
                    format!("nothing to resume: {} holds no checkpoint (no step-* folder in {}); run without --resume to start a new run", out.display(), checkpoint::checkpoints_dir(out).display())
                })?;
                let state = checkpoint::resume(&dir, &order, &self.varmap, self.optimizer.as_mut())?;
                report.resumed_from = Some(state.step);
                self.run_after_update()?;
                report.last_checkpoint = Some(dir);
                state
            }
            (out, false) => {
                // A new run would prune the old run's checkpoints and mix its curve into the log.
                if let Some(out) = out {
                    if let Some((step, _)) = checkpoint::list(out)?.last() {
                        bail!("{} already holds checkpoints (up to step {step}): resume from them, or choose another output folder", out.display());
                    }
                }
                TrainerState { order, ..Default::default() }
            }
        };
        // Every rank starts from rank 0's weights; only rank 0 logs and shows progress.
        dist::sync::broadcast_vars(&*self.world, &self.varmap)?;
        let root = self.world.is_root();
        let log = MetricsLog::open(cfg.output_dir.as_deref().filter(|_| root), report.resumed_from)?;
        let bar = log::progress_bar(cfg.progress && root, plan.total_steps, state.step);
        if let Some(step) = report.resumed_from {
            bar.println(format!("resumed from step {step} (epoch {})", state.epoch));
        }
        let seconds_before = state.train_seconds;
        Ok(Run {
            state,
            report,
            log,
            bar,
            started: Instant::now(),
            seconds_before,
            train_time: Duration::ZERO,
            window: (0, Instant::now()),
            last_eval_step: None,
            weights_checked_at: None,
        })
    }

    /// One optimizer step over `group` (its micro-batches): forward and backward, the checks of
    /// the loss (finite, not diverged) and of the gradient norm, clipping, the update.
    fn train_step<M, D>(&mut self, model: &M, train: &D, group: &[Vec<usize>], epoch: usize, total_steps: usize, run: &mut Run) -> Result<StepOutcome>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let started = Instant::now();
        // Each rank its own dropout masks (rank 0 those of a single process).
        let rank_seed = self.config.seed.wrapping_add((self.world.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        crate::nn::reseed(&self.device, rank_seed, run.state.step as u64)?;
        let items: usize = group.iter().map(Vec::len).sum();
        let (loss, mut grads) = self.accumulate(model, train, group, items)?;
        let (step, shown_epoch) = (run.state.step + 1, epoch + 1);
        let at = || format!("at step {step} (epoch {shown_epoch})");
        if !loss.is_finite() {
            return Err(run.stopped(format!("loss is {loss} {}", at())));
        }
        if let Err(diverged) = run.state.losses.observe(loss) {
            return Err(run.stopped(format!("training diverged {}: {diverged}", at())));
        }
        let grad_norm = optim::clip_grad_norm(&mut grads, self.config.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(run.stopped(format!("the gradient norm is {grad_norm} {}", at())));
        }
        let lr = self.config.lr * self.config.schedule.factor(run.state.step, total_steps);
        self.optimizer.step(&grads, lr)?;
        self.run_after_update()?;
        run.state.step += 1;
        run.state.samples_seen += items as u64;
        run.report.samples += items as u64;
        run.report.train_losses.push((run.state.step, loss));
        run.train_time += started.elapsed();
        run.window.0 += items as u64;
        run.bar.set_position(run.state.step as u64);
        Ok(StepOutcome { loss, lr, grad_norm, epoch })
    }

    /// Everything after an update: the log line, an evaluation and a checkpoint when due, and
    /// whether the run stops here (done, halted or stopped early).
    fn after_step<M, D>(&self, model: &M, eval: Option<&D>, plan: &Plan, done: StepOutcome, run: &mut Run) -> Result<bool>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let cfg = &self.config;
        let step = run.state.step;
        if step.is_multiple_of(cfg.log_every) || step == plan.total_steps {
            let rate = run.window.0 as f64 / run.window.1.elapsed().as_secs_f64().max(1e-9);
            run.window = (0, Instant::now());
            run.bar.set_message(format!("loss {:.4} lr {:.2e} {rate:.0} samples/s", done.loss, done.lr));
            run.log.write(serde_json::json!({"type": "train", "step": step, "epoch": done.epoch + 1, "loss": done.loss,
                "lr": done.lr, "grad_norm": done.grad_norm, "samples_per_s": rate}))?;
        }
        let epoch_done = step.is_multiple_of(plan.steps_per_epoch);
        if epoch_done {
            run.state.epoch = done.epoch + 1;
        }
        run.state.train_seconds = run.seconds_before + run.started.elapsed().as_secs_f64();
        let wants_eval = cfg.eval_every.is_some_and(|n| step.is_multiple_of(n)) || (epoch_done && cfg.eval_each_epoch);
        let improved = match (eval, wants_eval) {
            (Some(eval), true) => self.evaluate_during_run(model, eval, done.epoch + 1, run)?,
            _ => false,
        };
        // Rank 0's clock decides the time limit for all (the ranks must stop at the same step).
        let out_of_time = match cfg.time_limit {
            Some(t) => dist::sync::rank0_says(&*self.world, run.started.elapsed() >= t)?,
            None => false,
        };
        let halt = cfg.halt_at_step.is_some_and(|h| step >= h) || out_of_time;
        let stop_early = run.state.best.patience_spent(cfg.early_stopping_patience);
        let wants_save = improved
            || cfg.save_every.is_some_and(|n| step.is_multiple_of(n))
            || (epoch_done && cfg.save_each_epoch)
            || halt
            || stop_early
            || step == plan.total_steps;
        if let (Some(out), true) = (cfg.output_dir.as_deref(), wants_save) {
            let t = Instant::now();
            run.report.last_checkpoint = Some(self.save_checkpoint(out, &run.state)?);
            run.weights_checked_at = Some(step);
            run.window.1 += t.elapsed();
        }
        if stop_early {
            let metric = cfg.goal.as_ref().map_or("metric", |g| g.metric.as_str());
            run.bar.println(format!("early stopping at step {step}: no better {metric} for {} evaluations", run.state.best.evals_since_best));
            run.report.stopped_early = true;
        } else if halt {
            run.report.halted = true;
        }
        Ok(stop_early || halt || step >= plan.total_steps)
    }

    fn run_after_update(&self) -> Result<()> {
        match &self.after_update {
            Some(hook) => hook(&self.varmap),
            None => Ok(()),
        }
    }

    /// The save step: checks that every weight is finite, writes the checkpoint of `state.step`
    /// and removes the old ones beyond `keep_last` (never the best); returns its folder. Rank 0
    /// alone writes (the weights are the same on every rank).
    fn save_checkpoint(&self, out: &Path, state: &TrainerState) -> Result<PathBuf> {
        guard::check_weights_finite(&self.varmap, state.step)?;
        if !self.world.is_root() {
            return Ok(checkpoint::step_dir(out, state.step));
        }
        let dir = checkpoint::save(out, &self.varmap, self.optimizer.as_ref(), state)?;
        checkpoint::prune(out, self.config.keep_last, state.best.best_step)?;
        Ok(dir)
    }

    /// An evaluation during training: logged, shown, and recorded for the best checkpoint and
    /// early stopping; true when it is the new best.
    fn evaluate_during_run<M, D>(&self, model: &M, eval: &D, epoch: usize, run: &mut Run) -> Result<bool>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let t = Instant::now();
        let step = run.state.step;
        let metrics = self.evaluate_checked(model, eval, run)?;
        run.last_eval_step = Some(step);
        let improved = match &self.config.goal {
            Some(goal) => {
                let value = *metrics.get(&goal.metric).with_context(|| format!("evaluation has no metric {:?} (it has {:?})", goal.metric, metrics.keys()))?;
                run.state.best.record(goal, step, value)?
            }
            None => false,
        };
        let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("eval_{k} {v:.4}")).collect();
        run.bar.println(format!("step {step} epoch {epoch}: {}", shown.join(" ")));
        run.log.write_eval(step, epoch, &metrics)?;
        run.report.evals.push((step, metrics));
        run.window.1 += t.elapsed();
        Ok(improved)
    }

    /// The metrics of an evaluation during a run (at most `config.max_eval_batches` batches); a
    /// NaN or infinite one stops training: it must never be recorded, or kept as the best.
    fn evaluate_checked<M, D>(&self, model: &M, eval: &D, run: &Run) -> Result<Metrics>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let metrics = self.evaluate_batches(model, eval, self.config.max_eval_batches)?;
        if let Some((name, value)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(run.stopped(format!("the model has diverged: the evaluation at step {} gave {name} {value}", run.state.step)));
        }
        Ok(metrics)
    }

    /// After the last step: the weights checked finite (unless a checkpoint just did), an
    /// evaluation of the final weights, the loss curve and the report.
    fn finish<M, D>(&self, model: &M, eval: Option<&D>, mut run: Run) -> Result<TrainReport>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        run.bar.finish_and_clear();
        let step = run.state.step;
        if run.weights_checked_at != Some(step) {
            guard::check_weights_finite(&self.varmap, step)?;
        }
        // An evaluation of the final weights, unless the last step was just evaluated (logged
        // once: a resumed run that had finished finds it in the log already).
        if let (Some(eval), false) = (eval, run.last_eval_step == Some(step) || run.report.halted) {
            let metrics = self.evaluate_checked(model, eval, &run)?;
            if run.log.last_eval_step != Some(step) {
                run.log.write_eval(step, run.state.epoch, &metrics)?;
            }
            run.report.evals.push((step, metrics));
        }
        let output = self.config.output_dir.as_deref();
        if let Some(out) = output {
            run.log.plot(&out.join("loss_curve.svg"))?;
        }
        // No rank returns before rank 0 has written everything (a later read sees it all).
        self.world.barrier()?;
        let report = TrainReport {
            steps: step,
            epochs_completed: run.state.epoch,
            train_seconds: run.train_time.as_secs_f64(),
            samples_per_s: run.report.samples as f64 / run.train_time.as_secs_f64().max(1e-9),
            best: run.state.best.best(),
            best_checkpoint: output.zip(run.state.best.best_step).map(|(out, s)| checkpoint::step_dir(out, s)).filter(|d| d.is_dir()),
            ..run.report
        };
        Ok(report)
    }

    /// Loads the weights of the run's best checkpoint (by `config.goal`, as recorded in the newest
    /// checkpoint of `config.output_dir`) into the VarMap and returns its step; `None`, leaving
    /// the weights as they are, when there is none (no output folder, no goal, no evaluation).
    pub fn restore_best(&self) -> Result<Option<usize>> {
        let Some(out) = self.config.output_dir.as_deref() else { return Ok(None) };
        let Some(latest) = checkpoint::latest(out)? else { return Ok(None) };
        let Some(step) = checkpoint::read_state(&latest)?.best.best_step else { return Ok(None) };
        let dir = checkpoint::step_dir(out, step);
        checkpoint::load_varmap(&self.varmap, &dir.join(checkpoint::MODEL_FILE)).with_context(|| format!("restoring the best checkpoint (step {step})"))?;
        Ok(Some(step))
    }

    /// Runs this rank's shares of the micro-batches of one optimizer step; returns the mean loss
    /// and the gradients of the optimizer's parameters, weighted and summed across ranks so the
    /// step equals one on the whole group.
    fn accumulate<M, D>(&self, model: &M, data: &D, group: &[Vec<usize>], n_items: usize) -> Result<(f64, Vec<Option<Tensor>>)>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let params = self.optimizer.params();
        let mut total: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0.0;
        let world = self.world.world_size();
        for indices in group {
            let indices = dist::share(indices, self.world.rank(), world);
            if indices.is_empty() {
                continue; // a batch smaller than the world: other ranks have it all
            }
            let batch = data.batch(indices, &self.device)?;
            let loss = model.loss(&batch, true)?;
            let weight = indices.len() as f64 / n_items as f64;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * weight;
            let loss = if group.len() > 1 || world > 1 { (loss * weight)? } else { loss };
            let store = loss.backward()?;
            for (acc, g) in total.iter_mut().zip(optim::grads_of(params, &store)) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
        }
        let vars: Vec<&candle_core::Var> = params.iter().map(|p| &p.var).collect();
        dist::sync::all_reduce_grads(&*self.world, &vars, total, loss_sum)
    }

    /// Metrics of `model` on the whole of `data`, in evaluation mode (evaluations during
    /// [`Self::fit`] read at most `config.max_eval_batches` batches).
    pub fn evaluate<M, D>(&self, model: &M, data: &D) -> Result<Metrics>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        self.evaluate_batches(model, data, None)
    }

    /// Metrics of `model` on the first `limit` batches of `data` (all without a limit). With
    /// several ranks, rank r evaluates batches r, r + N, ...; every rank gets every output and
    /// summarizes them in the batches' order, as one process would.
    fn evaluate_batches<M, D>(&self, model: &M, data: &D, limit: Option<usize>) -> Result<Metrics>
    where
        M: TrainModel,
        D: Dataset<Batch = M::Batch>,
    {
        let batches = Batching::sequential(self.config.eval_batch_size).epoch(data.len(), 0)?;
        let n = limit.unwrap_or(usize::MAX);
        let (rank, world) = (self.world.rank(), self.world.world_size());
        let mine = batches.iter().take(n).skip(rank).step_by(world);
        let outputs = mine.map(|idx| model.evaluate(&data.batch(idx, &self.device)?)).collect::<Result<Vec<_>>>()?;
        let by_rank = dist::sync::all_gather_eval(&*self.world, outputs)?;
        // Batch i is output i / N of rank i % N.
        let count = by_rank.iter().map(Vec::len).sum::<usize>();
        let mut by_rank: Vec<_> = by_rank.into_iter().map(Vec::into_iter).collect();
        let in_order: Vec<_> = (0..count).filter_map(|i| by_rank[i % world].next()).collect();
        Ok(metrics::summarize(model.task(), &in_order))
    }
}

//! The trainer's settings, checked before any work starts: a value that would divide by zero,
//! train on NaN, or make early stopping silently never fire is an error naming the setting,
//! not a surprise at the first evaluation (or never).

use super::metrics::{self, EvalBatch, Task};
use super::{MetricGoal, Schedule};
use crate::data::Batching;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Evaluations during training read at most this many batches ([`super::Trainer::evaluate`]
    /// always reads the whole set).
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
    /// Continue from the newest checkpoint in `output_dir` (an error when there is none).
    pub resume: bool,
    pub progress: bool,
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

/// How a run over the training set is cut into batches and optimizer steps.
pub(super) struct Plan {
    pub batching: Batching,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl TrainerConfig {
    /// Optimizer steps a run over `train_len` items takes (what the LR schedule spans).
    pub fn total_steps(&self, train_len: usize) -> usize {
        // batch_size 0 is refused by `validate`; here it must not divide by zero.
        let steps_per_epoch = self.batching().batches_per_epoch(train_len).div_ceil(self.grad_accum.max(1));
        self.max_steps.unwrap_or_else(|| self.epochs.saturating_mul(steps_per_epoch))
    }

    fn batching(&self) -> Batching {
        Batching { batch_size: self.batch_size.max(1), shuffle: true, drop_last: self.drop_last, seed: self.seed }
    }

    /// Checks every setting for a model trained for `task`, with an evaluation set or without:
    /// counts of at least 1, a finite positive learning rate and clipping norm, a sane schedule,
    /// and early stopping that can fire (an evaluation set, a goal metric the task reports,
    /// evaluations during training).
    pub fn validate(&self, task: Task, has_eval: bool) -> Result<()> {
        let counts = [
            ("batch_size", Some(self.batch_size)),
            ("eval_batch_size", Some(self.eval_batch_size)),
            ("grad_accum", Some(self.grad_accum)),
            ("log_every", Some(self.log_every)),
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
            ("max_eval_batches", self.max_eval_batches),
            ("early_stopping_patience", self.early_stopping_patience),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, v)| *v == Some(0)) {
            bail!("{name} must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", self.lr);
        }
        if let Some(norm) = self.max_grad_norm.filter(|n| !(n.is_finite() && *n > 0.0)) {
            bail!("max_grad_norm must be a positive number when set, got {norm} (leave it unset to not clip)");
        }
        if let Schedule::CosineWarmup { min_ratio, .. } = self.schedule {
            if !(0.0..=1.0).contains(&min_ratio) {
                bail!("the cosine schedule's min_ratio (the floor of the learning rate, a fraction of it) must be between 0 and 1, got {min_ratio}");
            }
        }
        if let Some(goal) = &self.goal {
            let reported = metrics_reported(task);
            if !reported.contains(&goal.metric) {
                bail!("the goal metric {:?} is not one that evaluating this model reports ({task:?}: {})", goal.metric, reported.join(", "));
            }
        }
        if let Some(patience) = self.early_stopping_patience {
            let stopping = format!("early stopping (patience {patience})");
            if !has_eval {
                bail!("{stopping} needs an evaluation set: give one, or turn early stopping off");
            }
            if self.goal.is_none() {
                bail!("{stopping} needs a goal metric to watch (MetricGoal::minimize(\"loss\"), ...)");
            }
            if self.eval_every.is_none() && !self.eval_each_epoch {
                bail!("{stopping} needs evaluations during training: set eval_every or eval_each_epoch");
            }
        }
        Ok(())
    }

    /// The batches and steps of a run over `train_len` items; an empty plan is an error.
    pub(super) fn plan(&self, train_len: usize) -> Result<Plan> {
        if train_len == 0 {
            bail!("the training set is empty");
        }
        let batching = self.batching();
        let batches_per_epoch = batching.batches_per_epoch(train_len);
        if batches_per_epoch == 0 {
            bail!("the training set ({train_len} items) is smaller than one batch of {} with drop_last", self.batch_size);
        }
        let total_steps = self.total_steps(train_len);
        if total_steps == 0 {
            bail!("nothing to train: 0 epochs / 0 steps");
        }
        Ok(Plan { batching, steps_per_epoch: batches_per_epoch.div_ceil(self.grad_accum), total_steps })
    }
}

/// The metrics an evaluation of a `task` model reports: what [`metrics::summarize`] gives for a
/// batch with predictions (asking it, so that this list cannot drift from what it computes).
fn metrics_reported(task: Task) -> Vec<String> {
    // A batch with every kind of output (class predictions, regression scores): summarize keeps
    // what the task reports. `..Default::default()` leaves room for fields EvalBatch may gain.
    #[allow(clippy::needless_update)]
    let sample = EvalBatch {
        loss_sum: 1.0,
        count: 2,
        predictions: vec![0, 1],
        targets: vec![0, 1],
        scores: vec![0.0, 1.0],
        score_targets: vec![0.0, 1.0],
        ..Default::default()
    };
    metrics::summarize(task, &[sample]).into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_CLASSES: Task = Task::Classification { num_classes: 2 };

    fn err(cfg: TrainerConfig, task: Task, has_eval: bool) -> String {
        cfg.validate(task, has_eval).expect_err("must be refused").to_string()
    }

    #[test]
    fn counts_rates_norms_and_schedules_are_checked() {
        let default = TrainerConfig::default;
        assert!(default().validate(TWO_CLASSES, false).is_ok());
        for (cfg, name) in [
            (TrainerConfig { batch_size: 0, ..default() }, "batch_size"),
            (TrainerConfig { eval_batch_size: 0, ..default() }, "eval_batch_size"),
            (TrainerConfig { grad_accum: 0, ..default() }, "grad_accum"),
            (TrainerConfig { max_eval_batches: Some(0), ..default() }, "max_eval_batches"),
        ] {
            let e = err(cfg, TWO_CLASSES, true);
            assert!(e.contains(name) && e.contains("at least 1"), "{e}");
        }
        for lr in [0.0, -1e-3, f64::NAN, f64::INFINITY] {
            assert!(err(TrainerConfig { lr, ..default() }, TWO_CLASSES, true).contains("learning rate"));
        }
        for norm in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(err(TrainerConfig { max_grad_norm: Some(norm), ..default() }, TWO_CLASSES, true).contains("max_grad_norm"));
        }
        for min_ratio in [-1.0, 1.5, f64::NAN] {
            let cfg = TrainerConfig { schedule: Schedule::CosineWarmup { warmup: 3, min_ratio }, ..default() };
            assert!(err(cfg, TWO_CLASSES, true).contains("min_ratio"));
        }
        let fine = TrainerConfig { max_grad_norm: Some(1.0), schedule: Schedule::CosineWarmup { warmup: 3, min_ratio: 0.1 }, ..default() };
        assert!(fine.validate(TWO_CLASSES, true).is_ok());
    }

    #[test]
    fn early_stopping_that_could_never_fire_is_an_error() {
        let stopping = || TrainerConfig { early_stopping_patience: Some(3), goal: Some(MetricGoal::minimize("loss")), ..Default::default() };
        assert!(stopping().validate(TWO_CLASSES, true).is_ok());
        assert!(err(stopping(), TWO_CLASSES, false).contains("needs an evaluation set"));
        assert!(err(TrainerConfig { goal: None, ..stopping() }, TWO_CLASSES, true).contains("needs a goal metric"));
        let never_evaluated = TrainerConfig { eval_each_epoch: false, eval_every: None, ..stopping() };
        assert!(err(never_evaluated, TWO_CLASSES, true).contains("eval_every"));
        let e = err(TrainerConfig { early_stopping_patience: Some(0), ..stopping() }, TWO_CLASSES, true);
        assert!(e.contains("early_stopping_patience") && e.contains("at least 1"), "{e}");
    }

    #[test]
    fn a_goal_metric_the_task_never_reports_is_an_error_before_training() {
        let goal = |m: &str| TrainerConfig { goal: Some(MetricGoal::maximize(m)), ..Default::default() };
        let e = err(goal("accuracy"), Task::Regression, true);
        assert!(e.contains("\"accuracy\"") && e.contains("loss"), "{e}");
        assert!(err(goal("f1"), Task::Classification { num_classes: 3 }, true).contains("\"f1\""));
        assert!(err(goal("f1"), Task::LanguageModel, true).contains("perplexity"));
        assert!(err(goal("acc"), TWO_CLASSES, true).contains("accuracy, f1, loss"));
        for (task, metric) in [(TWO_CLASSES, "f1"), (TWO_CLASSES, "accuracy"), (Task::LanguageModel, "perplexity"), (Task::LanguageModel, "accuracy"), (Task::Regression, "loss"), (Task::Regression, "pearson"), (Task::Regression, "spearman")] {
            assert!(goal(metric).validate(task, true).is_ok(), "{task:?} {metric}");
        }
    }

    #[test]
    fn a_plan_with_nothing_to_train_is_an_error() -> Result<()> {
        let cfg = TrainerConfig { batch_size: 8, grad_accum: 2, epochs: 3, ..Default::default() };
        let plan = cfg.plan(50)?;
        assert_eq!((plan.steps_per_epoch, plan.total_steps), (4, 12)); // 7 batches, 2 a step
        assert!(cfg.plan(0).err().unwrap().to_string().contains("empty"));
        let dropping = TrainerConfig { drop_last: true, ..cfg.clone() };
        assert!(dropping.plan(7).err().unwrap().to_string().contains("smaller than one batch"));
        assert!(TrainerConfig { epochs: 0, ..cfg }.plan(50).err().unwrap().to_string().contains("nothing to train"));
        Ok(())
    }
}

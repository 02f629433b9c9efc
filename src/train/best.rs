//! Which evaluation was the best so far, by the run's goal metric: it decides which checkpoint
//! is kept as the best one and when early stopping fires. It is part of the trainer's saved
//! state, so a resumed run keeps counting where the interrupted one stopped.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which evaluation metric decides the best checkpoint and early stopping.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricGoal {
    /// A key of [`super::Metrics`]: `loss`, `accuracy`, `f1`, `perplexity`.
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

    /// Whether `value` beats `best`; a tie does not (the earlier checkpoint stays the best).
    fn improves(&self, value: f64, best: Option<f64>) -> bool {
        match best {
            None => true,
            Some(b) if self.higher_is_better => value > b,
            Some(b) => value < b,
        }
    }
}

/// The best evaluation so far and the evaluations since it (its fields are stored flat in
/// `trainer_state.json`, as before this type existed).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BestSoFar {
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    /// Evaluations since the best one (for early stopping).
    pub evals_since_best: usize,
}

impl BestSoFar {
    /// Records the goal metric of the evaluation at `step`; true when it is the new best. A NaN
    /// or infinite value is an error: it must never become the best checkpoint.
    pub fn record(&mut self, goal: &MetricGoal, step: usize, value: f64) -> Result<bool> {
        if !value.is_finite() {
            bail!("the evaluation at step {step} gave {} = {value}, which cannot be compared: the model has diverged", goal.metric);
        }
        if goal.improves(value, self.best_metric) {
            *self = Self { best_metric: Some(value), best_step: Some(step), evals_since_best: 0 };
            Ok(true)
        } else {
            self.evals_since_best += 1;
            Ok(false)
        }
    }

    /// Whether `patience` evaluations have passed without a new best (never without patience).
    pub fn patience_spent(&self, patience: Option<usize>) -> bool {
        patience.is_some_and(|p| self.evals_since_best >= p)
    }

    /// The best step and its metric, once there is one.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best_step.zip(self.best_metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_better_value_is_the_new_best_and_resets_the_patience_count() -> Result<()> {
        let mut best = BestSoFar::default();
        let goal = MetricGoal::minimize("loss");
        assert!(best.record(&goal, 2, 1.0)?);
        assert!(!best.record(&goal, 4, 1.5)?);
        assert_eq!(best.evals_since_best, 1);
        assert!(best.record(&goal, 6, 0.5)?);
        assert_eq!(best, BestSoFar { best_metric: Some(0.5), best_step: Some(6), evals_since_best: 0 });
        let mut acc = BestSoFar::default();
        let goal = MetricGoal::maximize("accuracy");
        assert!(acc.record(&goal, 1, 0.5)? && acc.record(&goal, 2, 0.75)?);
        assert!(!acc.record(&goal, 3, 0.25)?);
        assert_eq!(acc.best(), Some((2, 0.75)));
        Ok(())
    }

    #[test]
    fn a_tie_keeps_the_earlier_best_and_counts_towards_patience() -> Result<()> {
        let mut best = BestSoFar::default();
        let goal = MetricGoal::maximize("accuracy");
        best.record(&goal, 10, 0.9)?;
        assert!(!best.record(&goal, 20, 0.9)?);
        assert!(!best.record(&goal, 30, 0.9)?);
        assert_eq!(best.best(), Some((10, 0.9)));
        assert!(best.patience_spent(Some(2)) && !best.patience_spent(Some(3)) && !best.patience_spent(None));
        Ok(())
    }

    #[test]
    fn a_nan_or_infinite_evaluation_is_an_error_and_never_the_best() -> Result<()> {
        for goal in [MetricGoal::minimize("loss"), MetricGoal::maximize("accuracy")] {
            let mut best = BestSoFar::default();
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let err = best.record(&goal, 3, bad).unwrap_err().to_string();
                assert!(err.contains("step 3") && err.contains(&goal.metric), "{err}");
            }
            assert_eq!(best, BestSoFar::default(), "nothing recorded");
            best.record(&goal, 4, 0.5)?;
            assert!(best.record(&goal, 5, f64::NAN).is_err());
            assert_eq!(best.best(), Some((4, 0.5)));
        }
        Ok(())
    }
}

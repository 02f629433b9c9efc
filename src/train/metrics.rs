//! Evaluation outputs of a batch, and the metrics computed from a whole evaluation pass.

use anyhow::Result;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// What a model is trained for; it decides which metrics an evaluation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// loss, accuracy, and for two classes F1 of class 1.
    Classification { num_classes: usize },
    /// loss (nats per token), perplexity, token accuracy.
    LanguageModel,
    /// loss (mean squared error), and Pearson and Spearman correlation where the batches
    /// carry their scores.
    Regression,
}

/// One batch's contribution to an evaluation.
#[derive(Clone, Debug, Default)]
pub struct EvalBatch {
    /// Sum of per-item losses (items: examples, or tokens for a language model).
    pub loss_sum: f64,
    pub count: usize,
    pub predictions: Vec<u32>,
    pub targets: Vec<u32>,
    /// Predicted and true values of a regression (empty otherwise).
    pub scores: Vec<f32>,
    pub score_targets: Vec<f32>,
}

impl EvalBatch {
    /// From classification logits (..., classes) and integer targets of the leading shape.
    pub fn from_logits(logits: &Tensor, targets: &Tensor) -> Result<Self> {
        let count = targets.elem_count();
        let loss = crate::nn::cross_entropy(logits, targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Self {
            loss_sum: loss * count as f64,
            count,
            predictions: crate::nn::argmax_last(logits)?,
            targets: targets.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?,
            ..Default::default()
        })
    }

    /// From regression outputs (items,) and targets of the same shape: mean squared error, and
    /// the values themselves for the correlations.
    pub fn from_scores(scores: &Tensor, targets: &Tensor) -> Result<Self> {
        let count = targets.elem_count();
        let loss = candle_nn::loss::mse(scores, targets)?;
        let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(Self { scores: flat(scores)?, score_targets: flat(targets)?, ..Self::from_mean_loss(&loss, count)? })
    }

    /// From a mean loss over `count` items, with no predictions (regression).
    pub fn from_mean_loss(loss: &Tensor, count: usize) -> Result<Self> {
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Self { loss_sum: loss * count as f64, count, ..Default::default() })
    }
}

/// Named metric values: `loss`, `accuracy`, `f1`, `perplexity`, `pearson`, `spearman`.
pub type Metrics = BTreeMap<String, f64>;

/// Accumulates [`EvalBatch`]es and turns them into [`Metrics`].
pub fn summarize(task: Task, batches: &[EvalBatch]) -> Metrics {
    let count: usize = batches.iter().map(|b| b.count).sum();
    let loss = batches.iter().map(|b| b.loss_sum).sum::<f64>() / count.max(1) as f64;
    let mut m = Metrics::new();
    m.insert("loss".into(), loss);
    let pairs = || batches.iter().flat_map(|b| b.predictions.iter().zip(&b.targets));
    let n_pred: usize = batches.iter().map(|b| b.predictions.len()).sum();
    if n_pred > 0 && task != Task::Regression {
        let correct = pairs().filter(|(p, t)| p == t).count();
        m.insert("accuracy".into(), correct as f64 / n_pred as f64);
    }
    match task {
        Task::Classification { num_classes: 2 } if n_pred > 0 => {
            let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
            for (&p, &t) in pairs() {
                match (p, t) {
                    (1, 1) => tp += 1,
                    (1, _) => fp += 1,
                    (_, 1) => fn_ += 1,
                    _ => {}
                }
            }
            let f1 = if tp == 0 { 0.0 } else { 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64 };
            m.insert("f1".into(), f1);
        }
        Task::LanguageModel => {
            m.insert("perplexity".into(), loss.exp());
        }
        Task::Regression => {
            let scores: Vec<f64> = batches.iter().flat_map(|b| &b.scores).map(|&x| x as f64).collect();
            let targets: Vec<f64> = batches.iter().flat_map(|b| &b.score_targets).map(|&x| x as f64).collect();
            if !scores.is_empty() && scores.len() == targets.len() {
                m.insert("pearson".into(), pearson(&scores, &targets));
                m.insert("spearman".into(), spearman(&scores, &targets));
            }
        }
        _ => {}
    }
    m
}

/// Pearson's correlation coefficient of `x` and `y` (as scipy.stats.pearsonr). Where either
/// is constant the coefficient is undefined (scipy gives NaN); it is 0 here, "no linear
/// relation shown", so that a metric choosing the best checkpoint is never NaN.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    let (mean_x, mean_y) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mean_x, b - mean_y);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0)
}

/// Spearman's rank correlation (as scipy.stats.spearmanr): Pearson's coefficient of the
/// ranks, tied values sharing their mean rank.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// 1-based ranks, ties given the mean of the ranks they span.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        let mean_rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mean_rank;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_f1_and_perplexity() {
        let b = EvalBatch { loss_sum: 2.0, count: 4, predictions: vec![1, 1, 0, 0], targets: vec![1, 0, 1, 0], ..Default::default() };
        let m = summarize(Task::Classification { num_classes: 2 }, &[b.clone()]);
        assert_eq!(m["loss"], 0.5);
        assert_eq!(m["accuracy"], 0.5);
        assert_eq!(m["f1"], 0.5); // tp 1, fp 1, fn 1
        let m = summarize(Task::LanguageModel, &[b.clone(), b]);
        assert!((m["perplexity"] - 0.5f64.exp()).abs() < 1e-12);
        assert!(!m.contains_key("f1"));
    }

    #[test]
    fn pearson_and_spearman_match_numpy() {
        // numpy.corrcoef of the values, and of their ranks (what scipy's pearsonr/spearmanr compute):
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let y = [2.0, 1.0, 4.0, 3.0, 7.0, 5.0];
        assert!((pearson(&x, &y) - 0.7917946548886295).abs() < 1e-12);
        assert!((spearman(&x, &y) - 0.8285714285714287).abs() < 1e-12);
        // Ties share a mean rank: ranks of y are [1.5, 1.5, 3, 4.5, 4.5, 6].
        let y = [1.0, 1.0, 2.0, 3.0, 3.0, 9.0];
        assert!((spearman(&x, &y) - 0.9710083124552246).abs() < 1e-12);
        assert!((pearson(&x, &[-2.0, -4.0, -6.0, -8.0, -10.0, -12.0]) + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&x, &[3.0; 6]), 0.0, "undefined for a constant: 0, never NaN");
    }

    #[test]
    fn regression_batches_give_mse_and_correlations() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let scores = Tensor::new(&[1.0f32, 2.0, 3.0], &dev)?;
        let a = EvalBatch::from_scores(&scores, &Tensor::new(&[1.0f32, 3.0, 2.0], &dev)?)?;
        let b = EvalBatch::from_scores(&Tensor::new(&[5.0f32], &dev)?, &Tensor::new(&[4.0f32], &dev)?)?;
        let m = summarize(Task::Regression, &[a, b]);
        assert!((m["loss"] - 3.0 / 4.0).abs() < 1e-6, "squared errors 0, 1, 1, 1 over 4 items");
        assert!((m["pearson"] - pearson(&[1., 2., 3., 5.], &[1., 3., 2., 4.])).abs() < 1e-12);
        assert!((m["spearman"] - 0.8).abs() < 1e-12, "ranks [1,2,3,4] against [1,3,2,4]");
        assert!(!m.contains_key("accuracy"));
        Ok(())
    }
}

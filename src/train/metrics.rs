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
    /// loss only.
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
        })
    }

    /// From a mean loss over `count` items, with no predictions (regression).
    pub fn from_mean_loss(loss: &Tensor, count: usize) -> Result<Self> {
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Self { loss_sum: loss * count as f64, count, ..Default::default() })
    }
}

/// Named metric values: `loss`, `accuracy`, `f1`, `perplexity`.
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
        _ => {}
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_f1_and_perplexity() {
        let b = EvalBatch { loss_sum: 2.0, count: 4, predictions: vec![1, 1, 0, 0], targets: vec![1, 0, 1, 0] };
        let m = summarize(Task::Classification { num_classes: 2 }, &[b.clone()]);
        assert_eq!(m["loss"], 0.5);
        assert_eq!(m["accuracy"], 0.5);
        assert_eq!(m["f1"], 0.5); // tp 1, fp 1, fn 1
        let m = summarize(Task::LanguageModel, &[b.clone(), b]);
        assert!((m["perplexity"] - 0.5f64.exp()).abs() < 1e-12);
        assert!(!m.contains_key("f1"));
    }
}

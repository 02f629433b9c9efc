//! Ready-made [`TrainModel`]s for any `ModuleT` network: a classifier (cross-entropy), a
//! regressor (mean squared error) and a language model (cross-entropy over every position).

use super::{EvalBatch, Task, TrainModel};
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::ModuleT;

/// Batches of (inputs, class ids); the network returns logits (batch, classes).
pub struct Classifier<M> {
    pub net: M,
    pub num_classes: usize,
}

/// Cross-entropy of the logits `net` gives for `x` against the class ids `y` (any leading shape).
fn cross_entropy_loss(net: &impl ModuleT, (x, y): &(Tensor, Tensor), train: bool) -> Result<Tensor> {
    Ok(crate::nn::cross_entropy(&net.forward_t(x, train)?, y)?)
}

fn evaluate_logits(net: &impl ModuleT, (x, y): &(Tensor, Tensor)) -> Result<EvalBatch> {
    EvalBatch::from_logits(&net.forward_t(x, false)?, y)
}

impl<M: ModuleT> TrainModel for Classifier<M> {
    type Batch = (Tensor, Tensor);
    fn task(&self) -> Task {
        Task::Classification { num_classes: self.num_classes }
    }
    fn loss(&self, batch: &Self::Batch, train: bool) -> Result<Tensor> {
        cross_entropy_loss(&self.net, batch, train)
    }
    fn evaluate(&self, batch: &Self::Batch) -> Result<EvalBatch> {
        evaluate_logits(&self.net, batch)
    }
}

/// Batches of (inputs, targets) of the network's output shape; loss is the mean squared error.
pub struct Regressor<M> {
    pub net: M,
}

impl<M: ModuleT> TrainModel for Regressor<M> {
    type Batch = (Tensor, Tensor);
    fn task(&self) -> Task {
        Task::Regression
    }
    fn loss(&self, (x, y): &Self::Batch, train: bool) -> Result<Tensor> {
        Ok(candle_nn::loss::mse(&self.net.forward_t(x, train)?, y)?)
    }
    fn evaluate(&self, batch: &Self::Batch) -> Result<EvalBatch> {
        EvalBatch::from_mean_loss(&self.loss(batch, false)?, batch.0.dim(0)?)
    }
}

/// Batches of (input ids, target ids), both (batch, time); logits (batch, time, vocab).
pub struct LanguageModel<M> {
    pub net: M,
}

impl<M: ModuleT> TrainModel for LanguageModel<M> {
    type Batch = (Tensor, Tensor);
    fn task(&self) -> Task {
        Task::LanguageModel
    }
    fn loss(&self, batch: &Self::Batch, train: bool) -> Result<Tensor> {
        cross_entropy_loss(&self.net, batch, train)
    }
    fn evaluate(&self, batch: &Self::Batch) -> Result<EvalBatch> {
        evaluate_logits(&self.net, batch)
    }
}

//! Knowledge distillation through the shared Trainer (Hinton et al. 2015; DistilBERT's recipe,
//! Sanh et al. 2019): a [`Distillation`] is a [`TrainModel`] whose trainable part is the
//! student; the teacher only runs in evaluation mode (no dropout) and its outputs are detached.
//!
//! The loss is `α · KL(softmax(t/T) ‖ softmax(s/T)) · T² + (1 − α) · CE(s, labels)` (the KL term
//! as PyTorch's `kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean")`: summed over
//! classes, averaged over rows, i.e. examples or, for a language model, token positions), plus,
//! with weight `cosine`, `1 − cos` between the student's and teacher's last hidden states,
//! averaged over real tokens (BERT only; the widths must match).
//!
//! The teacher's logits may be cached, keyed by each row's tokens: since the teacher runs
//! without dropout, its logits of a row depend on the row's tokens alone (not on its batch or
//! padding, up to rounding), so computing them once is exact as long as the inputs are not
//! augmented (wick's text datasets are not). The cache holds logits only, so it is for
//! classifiers (a language model's logits are a vocabulary-sized vector per token) and not with
//! the cosine loss (which needs the teacher's hidden states at every step).

use crate::data::text::TextBatch;
use crate::models::bert::BertForSequenceClassification;
use crate::models::gpt2::GPT2LMHeadModel;
use crate::train::{EvalBatch, Task, TrainModel};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use std::collections::HashMap;
use std::sync::Mutex;

/// The distillation loss's settings.
#[derive(Clone, Copy, Debug)]
pub struct DistillConfig {
    /// Weight of the soft (teacher) term; `1 − alpha` weighs the hard labels.
    pub alpha: f64,
    /// Softmax temperature T of both distributions.
    pub temperature: f64,
    /// Weight of the hidden-state cosine loss (0 = off).
    pub cosine: f64,
    /// Compute each training row's teacher logits once and reuse them.
    pub cache_teacher: bool,
}

impl DistillConfig {
    pub fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!("--alpha {}: must be between 0 and 1", self.alpha);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("--temperature {}: must be greater than 0", self.temperature);
        }
        if !(self.cosine.is_finite() && self.cosine >= 0.0) {
            bail!("--cosine {}: must not be negative", self.cosine);
        }
        if self.cache_teacher && self.cosine > 0.0 {
            bail!("--cache-teacher keeps the teacher's logits only; the cosine loss needs its hidden states at every step: use one or the other");
        }
        Ok(())
    }
}

/// The last hidden states of a batch and the mask of its real tokens (batch, seq).
pub struct Hidden {
    pub states: Tensor,
    pub mask: Tensor,
}

/// A model that can be a teacher or a student.
pub trait Distillable: TrainModel {
    /// Logits as rows (items, classes) and, when `hidden`, the last hidden states.
    fn outputs(&self, batch: &Self::Batch, train: bool, hidden: bool) -> Result<(Tensor, Option<Hidden>)>;
    /// The model's own loss against the batch's labels, for these logits (rows).
    fn hard_loss(&self, logits: &Tensor, batch: &Self::Batch) -> Result<Tensor>;
    /// One key per row of logits that identifies the row's input (for the teacher cache), or an
    /// error when the family's logits cannot be cached.
    fn row_keys(batch: &Self::Batch) -> Result<Vec<Vec<u32>>>;
}

impl Distillable for BertForSequenceClassification {
    fn outputs(&self, b: &TextBatch, train: bool, hidden: bool) -> Result<(Tensor, Option<Hidden>)> {
        let (logits, states) = self.forward_with_hidden(&b.input_ids, Some(&b.attention_mask), Some(&b.token_type_ids), train)?;
        Ok((logits, hidden.then(|| Hidden { states, mask: b.attention_mask.clone() })))
    }
    fn hard_loss(&self, logits: &Tensor, b: &TextBatch) -> Result<Tensor> {
        let labels = b.labels.as_ref().ok_or_else(|| anyhow::anyhow!("a batch without labels cannot be trained on"))?;
        Ok(self.loss_of(logits, labels)?)
    }
    /// A row's real tokens (by the attention mask) and their token types.
    fn row_keys(b: &TextBatch) -> Result<Vec<Vec<u32>>> {
        let ids = b.input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let types = b.token_type_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mask = b.attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        Ok(ids
            .into_iter()
            .zip(types)
            .zip(mask)
            .map(|((ids, types), mask)| {
                let len = mask.iter().filter(|&&m| m != 0).count();
                ids[..len].iter().chain(&types[..len]).copied().collect()
            })
            .collect())
    }
}

impl Distillable for GPT2LMHeadModel {
    /// Logits of every position as rows; no hidden states (the cosine loss is BERT's).
    fn outputs(&self, (x, _): &(Tensor, Tensor), train: bool, hidden: bool) -> Result<(Tensor, Option<Hidden>)> {
        if hidden {
            bail!("the hidden-state cosine loss is implemented for BERT students only");
        }
        let logits = self.forward(x, None, None, None, train)?;
        let vocab = logits.dim(D::Minus1)?;
        Ok((logits.reshape(((), vocab))?, None))
    }
    fn hard_loss(&self, logits: &Tensor, (_, y): &(Tensor, Tensor)) -> Result<Tensor> {
        Ok(crate::nn::cross_entropy(logits, &y.flatten_all()?)?)
    }
    fn row_keys(_: &(Tensor, Tensor)) -> Result<Vec<Vec<u32>>> {
        bail!("--cache-teacher is for classifiers: a language model's teacher logits are a vocabulary-sized vector per token")
    }
}

/// `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, summed over classes and averaged over
/// rows (PyTorch's `kl_div(..., reduction="batchmean") * T**2`); `teacher` is not differentiated.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let rows = student.dim(0)? as f64;
    let log_p_student = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let log_p_teacher = candle_nn::ops::log_softmax(&(teacher.detach() / temperature)?, D::Minus1)?;
    let kl = log_p_teacher.exp()?.mul(&(log_p_teacher - log_p_student)?)?.sum_all()?;
    Ok((kl * (temperature * temperature / rows))?)
}

/// `1 − cos(student, teacher)` of the hidden states, averaged over the real tokens of `mask`.
pub fn cosine_loss(student: &Hidden, teacher: &Tensor) -> Result<Tensor> {
    let teacher = teacher.detach();
    let dot = student.states.mul(&teacher)?.sum(D::Minus1)?;
    let norms = student.states.sqr()?.sum(D::Minus1)?.sqrt()?.mul(&teacher.sqr()?.sum(D::Minus1)?.sqrt()?)?.clamp(1e-8, f64::INFINITY)?;
    let mask = student.mask.to_dtype(DType::F32)?;
    let cos = dot.div(&norms)?.mul(&mask)?.sum_all()?;
    Ok((1.0 - (cos / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?)?)
}

/// A student learning from a frozen teacher: the Trainer trains the student's variables (only
/// those go to the optimizer) and evaluates the student.
pub struct Distillation<M: Distillable> {
    pub student: M,
    pub teacher: M,
    pub config: DistillConfig,
    cache: Mutex<HashMap<Vec<u32>, Vec<f32>>>,
}

impl<M: Distillable> Distillation<M> {
    pub fn new(student: M, teacher: M, config: DistillConfig) -> Result<Self> {
        config.check()?;
        Ok(Self { student, teacher, config, cache: Mutex::new(HashMap::new()) })
    }

    /// Rows whose teacher logits are cached.
    pub fn cached_rows(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// The teacher's logits (rows) and hidden states for a batch: from the cache when on and
    /// complete for the batch, else from a forward pass (whose logits fill the cache).
    fn teacher_outputs(&self, batch: &M::Batch, device: &candle_core::Device) -> Result<(Tensor, Option<Hidden>)> {
        let hidden = self.config.cosine > 0.0;
        if !self.config.cache_teacher {
            return self.teacher.outputs(batch, false, hidden);
        }
        let keys = M::row_keys(batch)?;
        let mut cache = self.cache.lock().map_err(|_| anyhow::anyhow!("poisoned teacher cache"))?;
        if let Some(rows) = keys.iter().map(|k| cache.get(k).cloned()).collect::<Option<Vec<_>>>() {
            let classes = rows.first().map_or(0, Vec::len);
            return Ok((Tensor::new(rows.concat(), device)?.reshape((keys.len(), classes))?, None));
        }
        let (logits, _) = self.teacher.outputs(batch, false, false)?;
        for (key, row) in keys.into_iter().zip(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?) {
            cache.insert(key, row);
        }
        Ok((logits, None))
    }
}

impl<M: Distillable> TrainModel for Distillation<M> {
    type Batch = M::Batch;
    fn task(&self) -> Task {
        self.student.task()
    }
    fn loss(&self, batch: &M::Batch, train: bool) -> Result<Tensor> {
        let cfg = &self.config;
        let hidden = cfg.cosine > 0.0;
        let (logits, student_hidden) = self.student.outputs(batch, train, hidden)?;
        if cfg.alpha == 0.0 && !hidden {
            // The labels alone: the teacher's pass would be wasted (the baseline student).
            return self.student.hard_loss(&logits, batch);
        }
        let (teacher_logits, teacher_hidden) = self.teacher_outputs(batch, logits.device())?;
        if teacher_logits.dims() != logits.dims() {
            bail!("the teacher's logits are {:?}, the student's {:?}: they must share labels (or vocabulary)", teacher_logits.dims(), logits.dims());
        }
        let mut loss = (kd_loss(&logits, &teacher_logits, cfg.temperature)? * cfg.alpha)?;
        if cfg.alpha < 1.0 {
            loss = (loss + (self.student.hard_loss(&logits, batch)? * (1.0 - cfg.alpha))?)?;
        }
        if let (Some(s), Some(t)) = (student_hidden, teacher_hidden) {
            if s.states.dims() != t.states.dims() {
                bail!("the cosine loss needs hidden states of one width: the student's are {:?}, the teacher's {:?}", s.states.dims(), t.states.dims());
            }
            loss = (loss + (cosine_loss(&s, &t.states)? * cfg.cosine)?)?;
        }
        Ok(loss)
    }
    fn evaluate(&self, batch: &M::Batch) -> Result<EvalBatch> {
        self.student.evaluate(batch)
    }
}

//! BERT (Devlin et al. 2018) as Hugging Face `transformers` has it: `BertModel` (embeddings with
//! token types, post-LayerNorm encoder, tanh pooler) and `BertForSequenceClassification` (dropout
//! and a linear layer on the pooled output). Parameter names are the checkpoint's own, so
//! `model.safetensors` files load as they are and ours load in transformers.
//!
//! Every op on the training path has a gradient: LayerNorm and softmax switch to candle's fused
//! (gradient-less) kernels only when nothing needs a gradient.

use super::Activation;
use crate::nn::{dropout, dropout_add, LayerNorm};
use crate::ops::heads::{merge_heads, split_heads};
use candle_core::{DType, Module, Result, Tensor, D};
use crate::ops::linear::{Dense, WeightLayout};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// transformers' default `hidden_act` for BERT: the exact GELU.
fn default_act() -> Activation {
    Activation::Gelu
}

fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_position_type() -> String {
    "absolute".into()
}

/// `config.json` of a BERT checkpoint (the fields this model reads; others are kept in `extra`
/// so a saved config round-trips).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f64>,
    /// Class names by id (a JSON object with string keys "0", "1", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// The number of classes the classifier head has: `id2label`'s size, else `num_labels`, else 2
    /// (transformers' default).
    pub fn num_labels(&self) -> usize {
        match (&self.id2label, self.extra.get("num_labels").and_then(|v| v.as_u64())) {
            (Some(m), _) if !m.is_empty() => m.len(),
            (_, Some(n)) => n as usize,
            _ => 2,
        }
    }

    /// Class names in id order (`LABEL_i` where the config names none).
    pub fn labels(&self) -> Vec<String> {
        (0..self.num_labels())
            .map(|i| self.id2label.as_ref().and_then(|m| m.get(&i.to_string()).cloned()).unwrap_or_else(|| format!("LABEL_{i}")))
            .collect()
    }

    /// Sets `id2label`/`label2id` (and drops a stale `num_labels`, and a regression
    /// `problem_type`, which would make transformers train the classes with MSE).
    pub fn set_labels(&mut self, labels: &[String]) {
        self.id2label = Some(labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone())).collect());
        self.label2id = Some(labels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect());
        self.extra.remove("num_labels");
        if self.is_regression() {
            self.extra.remove("problem_type");
        }
    }

    /// True for a regression head (one output trained with MSE), as transformers decides it:
    /// `problem_type: "regression"`, or one label and no `problem_type`.
    pub fn is_regression(&self) -> bool {
        match self.extra.get("problem_type").and_then(|v| v.as_str()) {
            Some(problem) => problem == "regression",
            None => self.num_labels() == 1,
        }
    }

    /// Makes the head a regressor as transformers writes it (`num_labels=1,
    /// problem_type="regression"`): one label `LABEL_0`, and the problem type.
    pub fn set_regression(&mut self) {
        self.set_labels(&["LABEL_0".to_string()]);
        self.extra.insert("problem_type".into(), "regression".into());
    }

    fn check(&self) -> Result<()> {
        if self.position_embedding_type != "absolute" {
            candle_core::bail!("position_embedding_type {:?} is not supported (only \"absolute\")", self.position_embedding_type)
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            candle_core::bail!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads)
        }
        Ok(())
    }
}


/// Linear layers initialised as transformers does (normal, std 0.02; zero bias) when new.
fn dense(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Dense> {
    Dense::load_normal(vb, d_in, d_out, 0.02, WeightLayout::OutIn)
}

#[derive(Clone)]
struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(cfg.max_position_embeddings, h, vb.pp("position_embeddings"))?,
            token_type_embeddings: embedding(cfg.type_vocab_size, h, vb.pp("token_type_embeddings"))?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, train: bool) -> Result<Tensor> {
        let seq = input_ids.dim(1)?;
        let positions = Tensor::arange(0u32, seq as u32, input_ids.device())?;
        let x = self
            .word_embeddings
            .forward(input_ids)?
            .add(&self.token_type_embeddings.forward(token_type_ids)?)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        dropout(&self.layer_norm.forward(&x)?, self.dropout, train)
    }
}

#[derive(Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_output: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
    heads: usize,
    act: Activation,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let (attn, out) = (vb.pp("attention"), vb.pp("output"));
        Ok(Self {
            query: dense(attn.pp("self.query"), h, h)?,
            key: dense(attn.pp("self.key"), h, h)?,
            value: dense(attn.pp("self.value"), h, h)?,
            attention_output: dense(attn.pp("output.dense"), h, h)?,
            attention_norm: LayerNorm::load(attn.pp("output.LayerNorm"), h, eps)?,
            intermediate: dense(vb.pp("intermediate.dense"), h, cfg.intermediate_size)?,
            output: dense(out.pp("dense"), cfg.intermediate_size, h)?,
            output_norm: LayerNorm::load(out.pp("LayerNorm"), h, eps)?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
        })
    }

    fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let h = x.dim(2)?;
        let head_dim = h / self.heads;
        let split = |l: &Dense| -> Result<Tensor> { split_heads(&l.forward(x)?, self.heads) };
        let (q, k, v) = (split(&self.query)?, split(&self.key)?, split(&self.value)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let context = crate::ops::attention::attention_with_dropout(&q, &k, &v, key_mask, scale, false, self.attention_dropout, train)?;
        let context = merge_heads(&context)?;
        let x = self.attention_norm.forward(&dropout_add(&self.attention_output.forward(&context)?, x, self.hidden_dropout, train)?)?;
        let inner = self.act.apply(&self.intermediate.forward(&x)?)?;
        self.output_norm.forward(&dropout_add(&self.output.forward(&inner)?, &x, self.hidden_dropout, train)?)
    }
}

/// `BertModel`: embeddings, encoder and (optionally) the pooler. (Cloning shares the weights.)
#[derive(Clone)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Dense>,
    pub config: Config,
}

/// What [`BertModel::forward`] returns.
pub struct BertOutput {
    /// (batch, seq, hidden)
    pub last_hidden_state: Tensor,
    /// (batch, hidden): tanh(dense(first token)); `None` without a pooler.
    pub pooler_output: Option<Tensor>,
}

impl BertModel {
    /// Loads from names without the `bert.` prefix (`embeddings.*`, `encoder.layer.N.*`,
    /// `pooler.dense.*`).
    pub fn load(vb: VarBuilder, cfg: &Config, with_pooler: bool) -> Result<Self> {
        cfg.check()?;
        let layers = (0..cfg.num_hidden_layers).map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), cfg)).collect::<Result<_>>()?;
        let pooler = if with_pooler { Some(dense(vb.pp("pooler.dense"), cfg.hidden_size, cfg.hidden_size)?) } else { None };
        Ok(Self { embeddings: Embeddings::load(vb.pp("embeddings"), cfg)?, layers, pooler, config: cfg.clone() })
    }

    /// `input_ids`, `attention_mask` (1 = token, 0 = padding) and `token_type_ids`: (batch, seq)
    /// integer tensors; a missing mask means no padding, missing token types mean all zeros.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, token_type_ids: Option<&Tensor>, train: bool) -> Result<BertOutput> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!("sequence of {seq} tokens is longer than this model's max_position_embeddings ({})", self.config.max_position_embeddings)
        }
        let zeros;
        let token_types = match token_type_ids {
            Some(t) => t,
            None => {
                zeros = input_ids.zeros_like()?;
                &zeros
            }
        };
        // A mask with no padding changes nothing: skip it.
        let mask = match attention_mask {
            Some(m) if m.to_dtype(DType::F32)?.min_all()?.to_scalar::<f32>()? == 0.0 => Some(m.to_dtype(DType::U32)?),
            _ => None,
        };
        let mut x = self.embeddings.forward(input_ids, token_types, train)?;
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref(), train)?;
        }
        let pooler_output = match &self.pooler {
            Some(dense) => Some(dense.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()?),
            None => None,
        };
        Ok(BertOutput { last_hidden_state: x, pooler_output })
    }
}

/// `BertForSequenceClassification`: `bert.*` and `classifier.*`. A classifier (logits per
/// class, cross-entropy), or a regressor when the config says so (one output, MSE).
pub struct BertForSequenceClassification {
    pub bert: BertModel,
    classifier: Dense,
    dropout: f64,
}

impl BertForSequenceClassification {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let bert = BertModel::load(vb.pp("bert"), cfg, true)?;
        let classifier = dense(vb.pp("classifier"), cfg.hidden_size, cfg.num_labels())?;
        Ok(Self { bert, classifier, dropout: cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob) })
    }

    /// Logits (batch, num_labels); a regressor's scores are its one column.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, token_type_ids: Option<&Tensor>, train: bool) -> Result<Tensor> {
        Ok(self.forward_with_hidden(input_ids, attention_mask, token_type_ids, train)?.0)
    }

    /// The logits and the encoder's last hidden state (batch, seq, hidden), from one pass:
    /// distillation's cosine loss compares the hidden states of student and teacher.
    pub fn forward_with_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, token_type_ids: Option<&Tensor>, train: bool) -> Result<(Tensor, Tensor)> {
        let out = self.bert.forward(input_ids, attention_mask, token_type_ids, train)?;
        let pooled = out.pooler_output.expect("BertForSequenceClassification always has a pooler");
        Ok((self.classifier.forward(&dropout(&pooled, self.dropout, train)?)?, out.last_hidden_state))
    }

    pub fn is_regression(&self) -> bool {
        self.bert.config.is_regression()
    }

    /// transformers' loss for these logits: MSE of the scores against f32 targets for a
    /// regressor, else cross-entropy against class ids.
    pub fn loss_of(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        if self.is_regression() {
            candle_nn::loss::mse(&logits.squeeze(D::Minus1)?, labels)
        } else {
            crate::nn::cross_entropy(logits, labels)
        }
    }

    /// An evaluation's view of these logits: loss and class predictions, or loss and scores.
    pub fn eval_batch(&self, logits: &Tensor, labels: &Tensor) -> anyhow::Result<crate::train::EvalBatch> {
        if self.is_regression() {
            crate::train::EvalBatch::from_scores(&logits.squeeze(D::Minus1)?, labels)
        } else {
            crate::train::EvalBatch::from_logits(logits, labels)
        }
    }
}

/// Mean of the token vectors over the real (unpadded) tokens: sentence-transformers' pooling.
pub fn mean_pool(last_hidden_state: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(last_hidden_state.dtype())?.unsqueeze(D::Minus1)?;
    let summed = last_hidden_state.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    summed.broadcast_div(&counts)
}

/// L2-normalises rows (sentence-transformers' `Normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// Renames a checkpoint's tensors to the names this file's models use: legacy LayerNorm
/// `gamma`/`beta` become `weight`/`bias`, and the `bert.` prefix is added (`with_prefix`, for
/// [`BertForSequenceClassification`]) or removed (for [`BertModel`]) as needed. Task heads of
/// other models (`cls.*`) and buffers such as `position_ids` are dropped.
fn canonical_names(tensors: HashMap<String, Tensor>, with_prefix: bool) -> HashMap<String, Tensor> {
    let has_prefix = tensors.keys().any(|k| k.starts_with("bert."));
    tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("cls.") && !k.ends_with("position_ids"))
        .map(|(k, v)| {
            let k = if let Some(stem) = k.strip_suffix(".gamma") {
                format!("{stem}.weight")
            } else if let Some(stem) = k.strip_suffix(".beta") {
                format!("{stem}.bias")
            } else {
                k
            };
            let is_head = k.starts_with("classifier.");
            let k = match (with_prefix, has_prefix) {
                (true, false) if !is_head => format!("bert.{k}"),
                (false, true) => k.strip_prefix("bert.").map(String::from).unwrap_or(k),
                _ => k,
            };
            (k, v)
        })
        .collect()
}

impl BertModel {
    /// Every linear layer (the pooler's too) by its weight's name under `prefix`.
    fn named_linear_layers(&mut self, prefix: &str) -> Vec<(String, &mut Dense)> {
        let mut out = vec![];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let named = [
                ("attention.self.query", &mut l.query),
                ("attention.self.key", &mut l.key),
                ("attention.self.value", &mut l.value),
                ("attention.output.dense", &mut l.attention_output),
                ("intermediate.dense", &mut l.intermediate),
                ("output.dense", &mut l.output),
            ];
            out.extend(named.into_iter().map(|(name, dense)| (format!("{prefix}encoder.layer.{i}.{name}.weight"), dense)));
        }
        if let Some(pooler) = self.pooler.as_mut() {
            out.push((format!("{prefix}pooler.dense.weight"), pooler));
        }
        out
    }
}

impl crate::pretrained::Pretrained for BertModel {
    type Config = Config;
    const MODEL_TYPES: &'static [&'static str] = &["bert"];
    const ARCHITECTURE: &'static str = "BertModel";
    /// With the pooler when the checkpoint has one (sentence-transformers' folders do not).
    fn build(vb: VarBuilder, config: &Config) -> Result<Self> {
        let with_pooler = vb.contains_tensor("pooler.dense.weight");
        Self::load(vb, config, with_pooler)
    }
    fn canonical_names(tensors: HashMap<String, Tensor>, _config: &Config) -> HashMap<String, Tensor> {
        canonical_names(tensors, false)
    }
    fn linear_layers(&mut self) -> Vec<(String, &mut Dense)> {
        self.named_linear_layers("")
    }
}

impl crate::pretrained::Pretrained for BertForSequenceClassification {
    type Config = Config;
    const MODEL_TYPES: &'static [&'static str] = &["bert"];
    const ARCHITECTURE: &'static str = "BertForSequenceClassification";
    fn build(vb: VarBuilder, config: &Config) -> Result<Self> {
        Self::load(vb, config)
    }
    fn canonical_names(tensors: HashMap<String, Tensor>, _config: &Config) -> HashMap<String, Tensor> {
        canonical_names(tensors, true)
    }
    fn linear_layers(&mut self) -> Vec<(String, &mut Dense)> {
        let mut out = self.bert.named_linear_layers("bert.");
        out.push(("classifier.weight".into(), &mut self.classifier));
        out
    }
}

/// Fine-tuning through the shared trainer: cross-entropy (or MSE for a regressor) on the logits
/// of padded text batches.
impl crate::train::TrainModel for BertForSequenceClassification {
    type Batch = crate::data::text::TextBatch;
    fn task(&self) -> crate::train::Task {
        if self.is_regression() {
            crate::train::Task::Regression
        } else {
            crate::train::Task::Classification { num_classes: self.bert.config.num_labels() }
        }
    }
    fn loss(&self, b: &Self::Batch, train: bool) -> anyhow::Result<Tensor> {
        let logits = self.forward(&b.input_ids, Some(&b.attention_mask), Some(&b.token_type_ids), train)?;
        Ok(self.loss_of(&logits, batch_labels(b)?)?)
    }
    fn evaluate(&self, b: &Self::Batch) -> anyhow::Result<crate::train::EvalBatch> {
        let logits = self.forward(&b.input_ids, Some(&b.attention_mask), Some(&b.token_type_ids), false)?;
        self.eval_batch(&logits, batch_labels(b)?)
    }
}

fn batch_labels(b: &crate::data::text::TextBatch) -> anyhow::Result<&Tensor> {
    b.labels.as_ref().ok_or_else(|| anyhow::anyhow!("a batch without labels cannot be trained or evaluated on"))
}

//! GPT-2 (Radford et al. 2019) as Hugging Face `transformers` has it: `GPT2Model` (token and
//! position embeddings, pre-LayerNorm blocks of causal self-attention and an MLP, a final
//! LayerNorm) and `GPT2LMHeadModel` (the LM head tied to the token embedding `wte`).
//!
//! Parameter names are the checkpoint's own (`transformer.h.0.attn.c_attn.weight`, ...), so
//! `openai-community/gpt2` (-medium, -large, -xl), `distilgpt2` and models saved by transformers
//! load as they are ([`canonical_names`] adds or strips the `transformer.` prefix and drops the
//! `attn.bias` / `attn.masked_bias` buffers of old checkpoints), and ours load in transformers.
//!
//! GPT-2's `Conv1D` layers store their weights as (in, out): they are used as stored, never
//! transposed or copied per step. The LM head reads `wte` (vocab, n_embd) as its transpose, also
//! without a copy. Both are wick's one linear layer ([`Dense`]): on the CPU, products with few
//! rows (decoding) and every product with f16/bf16 weights go through [`crate::ops::matvec`],
//! which reads the weight once, converting it inside the product, on every thread of the rayon
//! pool; f32 prompt passes and training use one fused GEMM per layer.
//!
//! Inference keeps a [`KvCache`] per generation: keys and values of every layer live in
//! tensors preallocated for the whole generation and new positions are written in place
//! (`slice_set`), so a decoding step copies only the new token's keys and values. The cache also
//! keeps the attention mask of the positions it holds, so callers pass the mask of the new
//! tokens only.
//!
//! Padding: rows of a batch may be left-padded (transformers' convention for generation) with
//! `attention_mask` 0 on the padding and positions `cumsum(mask) - 1`. A padding token that
//! precedes every real token of its row has nothing to attend to (a plain softmax over nothing
//! is NaN); wick's attention gives such a query a zero output and zero gradient on every path,
//! as PyTorch's SDPA does, so batches run in the caller's order and even the logits at padding
//! positions match transformers'.
//!
//! Every op on the training path has a gradient (LayerNorm and softmax use candle's fused,
//! gradient-less kernels only when nothing needs a gradient); dropout is active only in training.
//!
//! Dtypes: f32, f16 and bf16 on the CPU and on CUDA. On the CPU a model loaded in f16 or bf16
//! keeps its weight matrices and embeddings in that dtype (half the memory, and half the bytes
//! decoding reads per token) but computes in f32: the hidden states, LayerNorm and the biases are
//! f32 (parameters that are training variables are converted per use), and the outputs (hidden
//! states, logits) come back in the model's dtype. The KV cache keeps keys and values in the
//! model's dtype, which the attention widens as it reads them. On CUDA everything is in the
//! model's dtype.

use super::Activation;
use crate::nn::{dropout, dropout_add, LayerNorm};
use crate::ops::linear::{Dense, WeightLayout};
use candle_core::{bail, DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One token id or several (`eos_token_id` may be a list in recent configs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

fn default_vocab() -> usize {
    50257
}
fn default_positions() -> usize {
    1024
}
fn default_embd() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_pdrop() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init_range() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}
fn default_act() -> Activation {
    Activation::GeluNew
}
fn default_special() -> Option<TokenIds> {
    Some(TokenIds::One(50256))
}

/// `config.json` of a GPT-2 checkpoint, with transformers' defaults for absent fields. Fields
/// this model does not read are kept in `extra`, so a loaded config saves back unchanged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// The context length: the number of position embeddings.
    #[serde(default = "default_positions")]
    pub n_positions: usize,
    #[serde(default = "default_embd")]
    pub n_embd: usize,
    #[serde(default = "default_layers")]
    pub n_layer: usize,
    #[serde(default = "default_layers")]
    pub n_head: usize,
    /// Width of the MLP; 4 · n_embd when absent or null.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f64,
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f64,
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Divide attention scores by sqrt(head_dim).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide them by (layer index + 1).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// transformers computes attention in f32 with this flag; wick's attention always takes its
    /// softmax in f32, so it changes nothing here.
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_special")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default = "default_special")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("the defaults parse")
    }
}

impl Config {
    /// A GPT-2-shaped config (GPT-2 small's defaults otherwise), `model_type` "gpt2".
    pub fn new(vocab_size: usize, n_positions: usize, n_embd: usize, n_layer: usize, n_head: usize) -> Self {
        Self { vocab_size, n_positions, n_embd, n_layer, n_head, model_type: Some("gpt2".into()), ..Default::default() }
    }

    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The end-of-sequence ids (empty when the config has none).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default()
    }

    pub fn check(&self) -> Result<()> {
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            bail!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head)
        }
        if self.vocab_size == 0 || self.n_positions == 0 || self.n_layer == 0 {
            bail!("vocab_size, n_positions and n_layer must be positive")
        }
        if self.extra.get("add_cross_attention").and_then(|v| v.as_bool()) == Some(true) {
            bail!("add_cross_attention (GPT-2 as a decoder of an encoder-decoder model) is not supported")
        }
        Ok(())
    }
}


/// transformers' `Conv1D`: weight (in, out), y = x · W + b, N(0, `std`²) and 0 when new.
fn conv1d(vb: VarBuilder, d_in: usize, d_out: usize, std: f64) -> Result<Dense> {
    Dense::load_normal(vb, d_in, d_out, std, WeightLayout::InOut)
}

/// LayerNorm in x's dtype (f32 on the CPU): parameters kept in another dtype (training
/// variables of an f16/bf16 model) are converted per use.
fn norm(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    crate::nn::layer_norm(x, &ln.weight.to_dtype(x.dtype())?, Some(&ln.bias.to_dtype(x.dtype())?), ln.eps)
}

/// An f16/bf16 parameter on the CPU as f32 (the dtype the CPU computes in), unless it is a
/// training variable (a copy would not follow its updates).
fn to_cpu_compute(t: Tensor) -> Result<Tensor> {
    if t.device().is_cpu() && t.dtype() != DType::F32 && !t.is_variable() {
        t.to_dtype(DType::F32)
    } else {
        Ok(t)
    }
}

fn ln_to_cpu_compute(ln: &mut LayerNorm) -> Result<()> {
    ln.weight = to_cpu_compute(ln.weight.clone())?;
    ln.bias = to_cpu_compute(ln.bias.clone())?;
    Ok(())
}

/// Keys and values of the positions seen so far, for every layer, and their attention mask.
///
/// The key/value tensors of a layer are allocated once for `capacity` positions (and grown by
/// doubling if a generation goes past it); new positions are written in place.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The dtype keys and values are kept in (None: as they come). A model in f16/bf16 keeps
    /// them in its dtype, also on the CPU where it computes in f32: half the bytes that every
    /// decoding step reads back (74 MB a token at 1,000 positions of GPT-2-small in f32),
    /// read by the attention with widening loads.
    dtype: Option<DType>,
    capacity: usize,
    len: usize,
    /// Per row, the mask (1 = real token) of every cached position, in cache order.
    mask: Vec<Vec<u32>>,
    /// Some cached position is padding.
    padded: bool,
}

impl KvCache {
    /// An empty cache for `n_layer` layers with room for `capacity` positions.
    pub fn new(n_layer: usize, capacity: usize) -> Self {
        Self { layers: vec![None; n_layer], capacity: capacity.max(1), len: 0, mask: vec![], padded: false, dtype: None }
    }

    /// The same, keeping keys and values in `dtype`.
    pub fn in_dtype(self, dtype: DType) -> Self {
        Self { dtype: Some(dtype), ..self }
    }

    /// The dtype keys and values are kept in, when set.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Positions cached (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything (the tensors are kept for reuse).
    pub fn reset(&mut self) {
        self.len = 0;
        self.mask.clear();
        self.padded = false;
    }

    fn batch(&self) -> Option<usize> {
        (self.len > 0).then_some(self.mask.len())
    }

    /// Writes layer `i`'s new keys and values (batch, heads, t, head_dim) after the cached ones
    /// and returns views of all of them (batch, heads, len + t, head_dim).
    fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, hd) = k.dims4()?;
        let (k, v) = match self.dtype {
            Some(dtype) => (&k.to_dtype(dtype)?, &v.to_dtype(dtype)?),
            None => (k, v),
        };
        let need = self.len + t;
        let fresh = |cap: usize| -> Result<(Tensor, Tensor)> {
            Ok((Tensor::zeros((b, h, cap, hd), k.dtype(), k.device())?, Tensor::zeros((b, h, cap, hd), v.dtype(), v.device())?))
        };
        let slot = &mut self.layers[i];
        let realloc = match slot {
            None => true,
            Some((ck, _)) => ck.dims4()? != (b, h, ck.dim(2)?, hd) || ck.dtype() != k.dtype() || ck.dim(2)? < need,
        };
        if realloc {
            let cap = if need > self.capacity { (2 * need).max(self.capacity) } else { self.capacity };
            let (nk, nv) = fresh(cap)?;
            if let (Some((ok, ov)), true) = (slot.as_ref(), self.len > 0) {
                nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.capacity = cap;
            *slot = Some((nk, nv));
        }
        let (ck, cv) = slot.as_ref().unwrap();
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((ck.narrow(2, 0, need)?, cv.narrow(2, 0, need)?))
    }

    /// Whether row `r` holds a real (unpadded) token.
    fn has_tokens(&self, r: usize) -> bool {
        self.mask.get(r).is_some_and(|m| m.contains(&1))
    }

    /// The key mask of an attention over the cached positions and `t` new ones of `b` rows
    /// (`new`: their mask, None = no padding): (b, len + t), 1 = attend; None when no position
    /// is padding.
    fn key_mask(&self, new: Option<&[Vec<u32>]>, b: usize, t: usize, device: &Device) -> Result<Option<Tensor>> {
        if new.is_none() && !self.padded {
            return Ok(None);
        }
        let mut flat = Vec::with_capacity(b * (self.len + t));
        for r in 0..b {
            if let Some(cached) = self.mask.get(r) {
                flat.extend_from_slice(cached);
            }
            match new {
                Some(rows) => flat.extend_from_slice(&rows[r]),
                None => flat.extend(std::iter::repeat_n(1u32, t)),
            }
        }
        Tensor::from_vec(flat, (b, self.len + t), device).map(Some)
    }

    /// Records `t` new positions of `b` rows with their mask (None = no padding), after every
    /// layer has appended their keys and values.
    fn advance(&mut self, new: Option<&[Vec<u32>]>, b: usize, t: usize) {
        if self.mask.is_empty() {
            self.mask = vec![vec![]; b];
        }
        for (r, row) in self.mask.iter_mut().enumerate() {
            match new {
                Some(rows) => {
                    self.padded |= rows[r].contains(&0);
                    row.extend_from_slice(&rows[r]);
                }
                None => row.extend(std::iter::repeat_n(1u32, t)),
            }
        }
        self.len += t;
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Dense,
    attn_proj: Dense,
    ln_2: LayerNorm,
    c_fc: Dense,
    mlp_proj: Dense,
    n_head: usize,
    scale: f64,
    act: Activation,
    resid_pdrop: f64,
    attn_pdrop: f64,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, index: usize) -> Result<Self> {
        let (h, inner) = (cfg.n_embd, cfg.inner_size());
        let std = cfg.initializer_range;
        // transformers (and GPT-2's paper) scale the residual projections' init by 1/sqrt(2·n_layer).
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        let mut scale = if cfg.scale_attn_weights { 1.0 / (cfg.head_dim() as f64).sqrt() } else { 1.0 };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        let mut block = Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), h, cfg.layer_norm_epsilon)?,
            c_attn: conv1d(vb.pp("attn.c_attn"), h, 3 * h, std)?,
            attn_proj: conv1d(vb.pp("attn.c_proj"), h, h, proj_std)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), h, cfg.layer_norm_epsilon)?,
            c_fc: conv1d(vb.pp("mlp.c_fc"), h, inner, std)?,
            mlp_proj: conv1d(vb.pp("mlp.c_proj"), inner, h, proj_std)?,
            n_head: cfg.n_head,
            scale,
            act: cfg.activation_function,
            resid_pdrop: cfg.resid_pdrop,
            attn_pdrop: cfg.attn_pdrop,
        };
        ln_to_cpu_compute(&mut block.ln_1)?;
        ln_to_cpu_compute(&mut block.ln_2)?;
        for conv in [&mut block.c_attn, &mut block.attn_proj, &mut block.c_fc, &mut block.mlp_proj] {
            conv.bias = conv.bias.take().map(to_cpu_compute).transpose()?;
        }
        Ok(block)
    }

    fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>, cache: Option<(&mut KvCache, usize)>, train: bool) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let hd = h / self.n_head;
        let qkv = self.c_attn.forward(&norm(&self.ln_1, x)?)?;
        // (b, t, 3, heads, hd) → (3, b, heads, t, hd): one copy gives contiguous q, k and v.
        let qkv = qkv.reshape((b, t, 3, self.n_head, hd))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let (k, v) = match cache {
            Some((cache, i)) => cache.append(i, &k, &v)?,
            None => (k, v),
        };
        let causal = t > 1; // one new query sees every cached key
        let context = crate::ops::attention::attention_with_dropout(&q, &k, &v, key_mask, self.scale, causal, self.attn_pdrop, train)?;
        let context = crate::ops::heads::merge_heads(&context)?;
        let x = dropout_add(&self.attn_proj.forward(&context)?, x, self.resid_pdrop, train)?;
        let inner = self.act.apply(&self.c_fc.forward(&norm(&self.ln_2, &x)?)?)?;
        dropout_add(&self.mlp_proj.forward(&inner)?, &x, self.resid_pdrop, train)
    }
}

/// Which positions' outputs a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Select {
    All,
    /// The last column of the input (the last real token of left-padded rows).
    Last,
}

/// `GPT2Model`: embeddings, blocks and the final LayerNorm.
pub struct GPT2Model {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    pub config: Config,
    device: Device,
}

impl GPT2Model {
    /// Loads from names without the `transformer.` prefix (`wte.weight`, `h.N.*`, `ln_f.*`).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.check()?;
        let std = cfg.initializer_range;
        let wte = vb.get_with_hints((cfg.vocab_size, cfg.n_embd), "wte.weight", Init::Randn { mean: 0.0, stdev: std })?;
        let wpe = vb.get_with_hints((cfg.n_positions, cfg.n_embd), "wpe.weight", Init::Randn { mean: 0.0, stdev: std })?;
        let blocks = (0..cfg.n_layer).map(|i| Block::load(vb.pp(format!("h.{i}")), cfg, i)).collect::<Result<_>>()?;
        let mut ln_f = LayerNorm::load(vb.pp("ln_f"), cfg.n_embd, cfg.layer_norm_epsilon)?;
        ln_to_cpu_compute(&mut ln_f)?;
        Ok(Self { wte, wpe, blocks, ln_f, config: cfg.clone(), device: vb.device().clone() })
    }

    /// The token embedding (vocab, n_embd), which the LM head shares.
    pub fn wte(&self) -> &Tensor {
        &self.wte
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// The dtype of the hidden states: f32 on the CPU, the model's elsewhere.
    fn compute_dtype(&self) -> DType {
        if self.device.is_cpu() {
            DType::F32
        } else {
            self.dtype()
        }
    }

    /// A cache for this model with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.blocks.len(), capacity).in_dtype(self.dtype())
    }

    /// Hidden states (batch, seq, n_embd) after `ln_f`.
    ///
    /// `input_ids`: (batch, seq) integers. `position_ids`: (batch, seq), default
    /// `cached + 0..seq` (transformers' default, which ignores padding: give `cumsum(mask) - 1`
    /// for left-padded rows). `attention_mask`: (batch, seq) for the new tokens, 1 = token,
    /// 0 = padding; the cache remembers the mask of earlier positions. With a `cache`, the keys
    /// and values of these tokens are added to it and attention covers every cached position.
    pub fn forward(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, attention_mask: Option<&Tensor>, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        self.run(input_ids, position_ids, attention_mask, cache, train, Select::All)?.to_dtype(self.dtype())
    }

    fn run(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, attention_mask: Option<&Tensor>, mut cache: Option<&mut KvCache>, train: bool, select: Select) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 {
            bail!("empty input: no tokens")
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(cb) = cache.as_ref().and_then(|c| c.batch()) {
            if cb != b {
                bail!("the cache holds {cb} rows but the input has {b}")
            }
        }
        let n_pos = self.config.n_positions;
        let ids = input_ids.to_dtype(DType::U32)?;
        let positions = match position_ids {
            Some(p) => {
                if p.dims() != [b, t] {
                    bail!("position_ids has shape {:?}, the input ids {:?}", p.dims(), [b, t])
                }
                let p = p.to_dtype(DType::U32)?;
                let max = p.max_all()?.to_scalar::<u32>()? as usize;
                if max >= n_pos {
                    bail!("position {max} is past this model's context of {n_pos} positions (n_positions): the sequence is too long")
                }
                p
            }
            None => {
                if past + t > n_pos {
                    bail!("a sequence of {} tokens is longer than this model's context of {n_pos} positions (n_positions)", past + t)
                }
                Tensor::arange(past as u32, (past + t) as u32, &self.device)?.unsqueeze(0)?.broadcast_as((b, t))?.contiguous()?
            }
        };

        // The mask of the new tokens, on the host (it is small), or None: no padding at all.
        let new_mask: Option<Vec<Vec<u32>>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    bail!("attention_mask has shape {:?}, the input ids {:?}", m.dims(), [b, t])
                }
                let rows = m.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                let rows: Vec<Vec<u32>> = rows.into_iter().map(|r| r.into_iter().map(|v| u32::from(v != 0)).collect()).collect();
                rows.iter().any(|r| r.contains(&0)).then_some(rows)
            }
            None => None,
        };
        if let Some(rows) = &new_mask {
            for (r, row) in rows.iter().enumerate() {
                if !row.contains(&1) && !cache.as_ref().is_some_and(|c| c.has_tokens(r)) {
                    bail!("row {r} of the batch has no tokens (its attention_mask is all 0)")
                }
            }
        }
        // Left padding needs nothing special: a padding query before its row's first token sees
        // no key, and the attention op gives such a query a zero output with zero gradient (as
        // PyTorch's SDPA does), so nothing undefined reaches the real tokens, the cache or the
        // gradients.
        let key_mask = match cache.as_ref() {
            Some(c) => c.key_mask(new_mask.as_deref(), b, t, &self.device)?,
            None => new_mask.as_ref().and(attention_mask.cloned()),
        };

        let act = self.compute_dtype();
        let x = embed(&self.wte, &ids)?.to_dtype(act)?.add(&embed(&self.wpe, &positions)?.to_dtype(act)?)?;
        let mut x = dropout(&x, self.config.embd_pdrop, train)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = block.forward(&x, key_mask.as_ref(), layer_cache, train)?;
        }
        if let Some(c) = cache {
            c.advance(new_mask.as_deref(), b, t);
        }
        match select {
            Select::All => norm(&self.ln_f, &x),
            Select::Last => norm(&self.ln_f, &x.narrow(1, t - 1, 1)?.squeeze(1)?),
        }
    }
}

/// Rows of `table` (n, d) for `ids` (batch, seq) → (batch, seq, d).
fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, table.dim(1)?))
}

/// `GPT2LMHeadModel`: `transformer.*`, and the LM head, tied to `transformer.wte.weight` (an
/// untied `lm_head.weight` is read when the config says `tie_word_embeddings: false`).
pub struct GPT2LMHeadModel {
    pub transformer: GPT2Model,
    /// (vocab, n_embd), no bias: `wte` itself when tied, read as its transpose without a copy.
    lm_head: Dense,
}

impl GPT2LMHeadModel {
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let transformer = GPT2Model::load(vb.pp("transformer"), cfg)?;
        let weight = if cfg.tie_word_embeddings {
            transformer.wte.clone()
        } else {
            vb.get_with_hints((cfg.vocab_size, cfg.n_embd), "lm_head.weight", Init::Randn { mean: 0.0, stdev: cfg.initializer_range })?
        };
        Ok(Self { transformer, lm_head: Dense::new(weight, None, WeightLayout::OutIn) })
    }

    pub fn config(&self) -> &Config {
        &self.transformer.config
    }

    pub fn new_cache(&self, capacity: usize) -> KvCache {
        self.transformer.new_cache(capacity)
    }

    /// Logits (..., vocab) in the model's dtype of hidden states (..., n_embd).
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head_computed(hidden)?.to_dtype(self.transformer.dtype())
    }

    /// [`Self::head`]'s logits in the dtype the model computes in: f32 on the CPU, whatever
    /// the weights' dtype.
    fn head_computed(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = dims[dims.len() - 1];
        let rows = hidden.elem_count() / h;
        let logits = self.lm_head.forward(&hidden.reshape((rows, h))?)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.lm_head.weight.dim(0)?;
        logits.reshape(out)
    }

    /// Logits (batch, seq, vocab); the arguments are [`GPT2Model::forward`]'s.
    pub fn forward(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, attention_mask: Option<&Tensor>, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        self.head(&self.transformer.run(input_ids, position_ids, attention_mask, cache, train, Select::All)?)
    }

    /// Logits (batch, vocab) of the last input column only (the last token of left-padded
    /// rows): what generation needs, without the LM head's cost at the other positions.
    pub fn forward_last(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, attention_mask: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits_last(input_ids, position_ids, attention_mask, cache)?.to_dtype(self.transformer.dtype())
    }

    /// [`Self::forward_last`]'s logits in the dtype the model computes in (f32 on the CPU):
    /// what generation reads, without rounding f32 logits to f16/bf16 and widening them again
    /// (two passes over the vocabulary a token).
    fn logits_last(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, attention_mask: Option<&Tensor>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        crate::ops::on_cpu_pool(&self.transformer.device, || self.head_computed(&self.transformer.run(input_ids, position_ids, attention_mask, cache, false, Select::Last)?))
    }
}

impl GPT2LMHeadModel {
    /// Mean next-token cross-entropy of `input_ids` (batch, seq) against `targets` (batch, seq),
    /// unpadded: the training loss. The (tokens, vocab) logits go from the head's product
    /// straight into the loss with no reshape in between, since every graph node on a tensor
    /// that large costs a gradient buffer of its size in the backward pass.
    pub fn lm_loss(&self, input_ids: &Tensor, targets: &Tensor, train: bool) -> Result<Tensor> {
        let hidden = self.transformer.forward(input_ids, None, None, None, train)?;
        let h = hidden.dim(2)?;
        let hidden = hidden.reshape(((), h))?;
        let logits = self.lm_head.forward(&hidden)?;
        crate::nn::cross_entropy(&logits, &targets.flatten_all()?)
    }
}

impl crate::train::TrainModel for GPT2LMHeadModel {
    /// (input ids, target ids), both (batch, seq): `TokenWindows`' batches.
    type Batch = (Tensor, Tensor);
    fn task(&self) -> crate::train::Task {
        crate::train::Task::LanguageModel
    }
    fn loss(&self, (x, y): &Self::Batch, train: bool) -> anyhow::Result<Tensor> {
        Ok(self.lm_loss(x, y, train)?)
    }
    fn evaluate(&self, (x, y): &Self::Batch) -> anyhow::Result<crate::train::EvalBatch> {
        crate::train::EvalBatch::from_logits(&self.forward(x, None, None, None, false)?, y)
    }
}

/// Generation (`wick::generate`) with the KV cache: the prompt pass and each decoding step
/// compute the logits of the last column only.
impl crate::generate::CausalLm for GPT2LMHeadModel {
    type Cache = KvCache;

    fn new_cache(&self, _batch: usize, capacity: usize) -> anyhow::Result<KvCache> {
        Ok(self.new_cache(capacity))
    }

    fn forward_last(&self, ids: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut KvCache) -> anyhow::Result<Tensor> {
        Ok(self.logits_last(ids, Some(positions), Some(mask), Some(cache))?)
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config().n_positions)
    }

    fn device(&self) -> &Device {
        self.transformer.device()
    }
}

impl ModuleT for GPT2LMHeadModel {
    /// Logits (batch, seq, vocab) of unpadded ids (batch, seq): the training path.
    fn forward_t(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        self.forward(input_ids, None, None, None, train)
    }
}

/// Renames a checkpoint's tensors to this file's names: the `transformer.` prefix is added
/// (`with_prefix`, for [`GPT2LMHeadModel`]) or removed (for [`GPT2Model`]) as needed, and the
/// causal-mask buffers old checkpoints carry (`h.N.attn.bias`, `h.N.attn.masked_bias`) are
/// dropped, as is a tied `lm_head.weight` when `keep_lm_head` is false.
fn canonical_names(tensors: HashMap<String, Tensor>, with_prefix: bool, keep_lm_head: bool) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .filter(|(k, _)| !k.ends_with(".attn.bias") && !k.ends_with(".attn.masked_bias"))
        .filter(|(k, _)| keep_lm_head || k != "lm_head.weight")
        .map(|(k, v)| {
            if k.starts_with("lm_head.") {
                return (k, v);
            }
            let stem = k.strip_prefix("transformer.").unwrap_or(&k).to_string();
            (if with_prefix { format!("transformer.{stem}") } else { stem }, v)
        })
        .collect()
}

impl GPT2Model {
    /// The blocks' four linear layers by their weights' names under `prefix`.
    fn named_linear_layers(&mut self, prefix: &str) -> Vec<(String, &mut Dense)> {
        let mut out = vec![];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, dense) in [("attn.c_attn", &mut b.c_attn), ("attn.c_proj", &mut b.attn_proj), ("mlp.c_fc", &mut b.c_fc), ("mlp.c_proj", &mut b.mlp_proj)] {
                out.push((format!("{prefix}h.{i}.{name}.weight"), dense));
            }
        }
        out
    }
}

impl crate::pretrained::Pretrained for GPT2LMHeadModel {
    type Config = Config;
    const MODEL_TYPES: &'static [&'static str] = &["gpt2"];
    const ARCHITECTURE: &'static str = "GPT2LMHeadModel";
    fn build(vb: VarBuilder, config: &Config) -> Result<Self> {
        Self::load(vb, config)
    }
    fn canonical_names(tensors: HashMap<String, Tensor>, config: &Config) -> HashMap<String, Tensor> {
        canonical_names(tensors, true, !config.tie_word_embeddings)
    }
    /// The LM head is `lm_head.weight` even when tied to `wte`.
    fn linear_layers(&mut self) -> Vec<(String, &mut Dense)> {
        let mut out = self.transformer.named_linear_layers("transformer.");
        out.push(("lm_head.weight".into(), &mut self.lm_head));
        out
    }
}

impl crate::pretrained::Pretrained for GPT2Model {
    type Config = Config;
    const MODEL_TYPES: &'static [&'static str] = &["gpt2"];
    const ARCHITECTURE: &'static str = "GPT2Model";
    fn build(vb: VarBuilder, config: &Config) -> Result<Self> {
        Self::load(vb, config)
    }
    fn canonical_names(tensors: HashMap<String, Tensor>, _config: &Config) -> HashMap<String, Tensor> {
        canonical_names(tensors, false, false)
    }
    fn linear_layers(&mut self) -> Vec<(String, &mut Dense)> {
        self.named_linear_layers("")
    }
}

/// Several independent sequences fed together (continuous batching: `wick serve`).
///
/// Each sequence has its own [`KvCache`] (one row) and so its own length and position, and gets
/// its own new tokens: a whole prompt for an empty cache, one token for a decoding step. Their
/// tokens are stacked as rows: the embeddings, every `Conv1D`, the LayerNorms and the LM head
/// run once on all of them (the weights are read once for all); only attention runs per
/// sequence, its new queries (causal among themselves) against its own cache.
impl GPT2LMHeadModel {
    /// Logits (rows, vocab) after feeding `tokens[r]` to the sequence in `caches[r]`; each
    /// cache grows by one position.
    pub fn decode_rows(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let tokens: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        self.feed_rows(&tokens, caches)
    }

    /// Logits (sequences, vocab) of the last new token of each sequence after feeding
    /// `tokens[r]` (one or more) to the sequence in `caches[r]` (empty, or holding one row).
    pub fn feed_rows(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        crate::ops::on_cpu_pool(&self.transformer.device, || self.feed_rows_here(tokens, caches))
    }

    fn feed_rows_here(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let model = &self.transformer;
        let n = tokens.len();
        if n == 0 || caches.len() != n {
            bail!("feed_rows: {n} sequences for {} caches", caches.len())
        }
        let (mut ids, mut positions, mut last) = (vec![], vec![], Vec::with_capacity(n));
        for (r, (new, cache)) in tokens.iter().zip(caches.iter()).enumerate() {
            if new.is_empty() || !matches!(cache.batch(), None | Some(1)) {
                bail!("feed_rows: sequence {r} needs at least one new token and a cache of one sequence")
            }
            // Positions continue from the count of real tokens so far.
            let start = cache.mask.first().map_or(0, |m| m.iter().filter(|&&m| m == 1).count());
            if start + new.len() > model.config.n_positions {
                bail!("a sequence of {} tokens is longer than this model's context of {} positions (n_positions)", start + new.len(), model.config.n_positions)
            }
            ids.extend_from_slice(new);
            positions.extend((start..start + new.len()).map(|p| p as u32));
            last.push((ids.len() - 1) as u32);
        }
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, (rows, 1), &model.device)?;
        let positions = Tensor::from_vec(positions, (rows, 1), &model.device)?;
        let act = model.compute_dtype();
        let mut x = embed(&model.wte, &ids)?.to_dtype(act)?.add(&embed(&model.wpe, &positions)?.to_dtype(act)?)?;
        let lens: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        for (i, block) in model.blocks.iter().enumerate() {
            x = block.forward_rows(&x, &lens, caches, i)?;
        }
        for (cache, &t) in caches.iter_mut().zip(&lens) {
            cache.advance(None, 1, t);
        }
        let x = x.reshape((rows, x.dim(2)?))?.index_select(&Tensor::new(last.as_slice(), &model.device)?, 0)?;
        self.head(&norm(&model.ln_f, &x)?)
    }
}

impl Block {
    /// [`Block::forward`] in inference for `x` (rows, 1, n_embd) holding `lens[r]` consecutive
    /// rows of sequence r, which attend to `caches[r]` (layer `layer`).
    fn forward_rows(&self, x: &Tensor, lens: &[usize], caches: &mut [&mut KvCache], layer: usize) -> Result<Tensor> {
        let (rows, _, h) = x.dims3()?;
        let hd = h / self.n_head;
        let qkv = self.c_attn.forward(&norm(&self.ln_1, x)?)?;
        // (rows, 3, heads, hd) → (3, rows, heads, hd): one copy gives q, k and v, whose rows each
        // sequence takes in turn as (1, heads, t, hd): a view without a copy for one new token.
        let qkv = qkv.reshape((rows, 3, self.n_head, hd))?.permute((1, 0, 2, 3))?.contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let mut contexts = Vec::with_capacity(lens.len());
        let mut start = 0;
        for (cache, &t) in caches.iter_mut().zip(lens) {
            let rows_of = |m: &Tensor| -> Result<Tensor> { m.narrow(0, start, t)?.permute((1, 0, 2))?.unsqueeze(0) };
            let (keys, values) = cache.append(layer, &rows_of(&k)?, &rows_of(&v)?)?;
            let key_mask = cache.key_mask(None, 1, t, x.device())?;
            let context = crate::ops::attention::attention(&rows_of(&q)?, &keys, &values, key_mask.as_ref(), self.scale, t > 1)?;
            contexts.push(crate::ops::heads::merge_heads(&context)?.reshape((t, 1, h))?);
            start += t;
        }
        let context = Tensor::cat(&contexts, 0)?;
        let x = (self.attn_proj.forward(&context)? + x)?;
        let inner = self.act.apply(&self.c_fc.forward(&norm(&self.ln_2, &x)?)?)?;
        self.mlp_proj.forward(&inner)? + x
    }
}

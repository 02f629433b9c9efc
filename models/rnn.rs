//! Recurrent networks: multi-layer LSTM and GRU with PyTorch's `nn.LSTM`/`nn.GRU` weights
//! (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, ..., gate order i,f,g,o for the
//! LSTM and r,z,n for the GRU), batch-first; a character-level language model and a sequence
//! classifier on top.
//!
//! On the CPU in f32 an LSTM runs each layer over the whole sequence as one fused op
//! ([`crate::ops::lstm_layer`]: one GEMM for every step's input part, one recurrent GEMM and one
//! cell pass a step, the weight gradients of all steps as one GEMM). Elsewhere, and for the GRU,
//! the layers run step by step with candle ops ([`Rnn::forward_steps`]).

use crate::generate::{CausalLm, GenerationConfig};
use crate::ops::linear::Dense;
use crate::ops::lstm_layer::{lstm_layer, LstmWeights};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{embedding, Embedding, Init, Module, ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    Lstm,
    Gru,
}

impl Cell {
    fn gates(&self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }
}

impl std::str::FromStr for Cell {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lstm" => Ok(Cell::Lstm),
            "gru" => Ok(Cell::Gru),
            other => anyhow::bail!("unknown cell {other:?}: expected lstm or gru"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RnnConfig {
    pub cell: Cell,
    pub input_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Dropout on the outputs of every layer but the last, in training (PyTorch's `dropout`).
    #[serde(default)]
    pub dropout: f64,
}

struct Layer {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

/// Final hidden state `h` (layers, batch, hidden), and for the LSTM the cell state `c`.
#[derive(Clone, Debug)]
pub struct RnnState {
    pub h: Tensor,
    pub c: Option<Tensor>,
}

impl RnnState {
    /// The state of batch row `r` alone (batch 1).
    pub fn row(&self, r: usize) -> Result<Self> {
        Ok(Self { h: self.h.narrow(1, r, 1)?, c: self.c.as_ref().map(|c| c.narrow(1, r, 1)).transpose()? })
    }

    /// The states of several batches, one after the other along the batch.
    pub fn cat_rows(states: &[Self]) -> Result<Self> {
        let h = Tensor::cat(&states.iter().map(|s| &s.h).collect::<Vec<_>>(), 1)?;
        let c = states.iter().map(|s| s.c.as_ref()).collect::<Option<Vec<_>>>().map(|c| Tensor::cat(&c, 1)).transpose()?;
        Ok(Self { h, c })
    }
}

pub struct Rnn {
    cfg: RnnConfig,
    layers: Vec<Layer>,
}

impl Rnn {
    pub fn load(vb: VarBuilder, cfg: &RnnConfig) -> Result<Self> {
        if cfg.num_layers == 0 || cfg.hidden_size == 0 {
            candle_core::bail!("an RNN needs at least one layer and a hidden size above 0")
        }
        let (h, g) = (cfg.hidden_size, cfg.cell.gates());
        // PyTorch's initialisation: U(-1/sqrt(hidden), 1/sqrt(hidden)) for every tensor.
        let bound = 1.0 / (h as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let layers = (0..cfg.num_layers)
            .map(|k| {
                let input = if k == 0 { cfg.input_size } else { h };
                Ok(Layer {
                    w_ih: vb.get_with_hints((g * h, input), &format!("weight_ih_l{k}"), init)?,
                    w_hh: vb.get_with_hints((g * h, h), &format!("weight_hh_l{k}"), init)?,
                    b_ih: vb.get_with_hints(g * h, &format!("bias_ih_l{k}"), init)?,
                    b_hh: vb.get_with_hints(g * h, &format!("bias_hh_l{k}"), init)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg: cfg.clone(), layers })
    }

    pub fn config(&self) -> &RnnConfig {
        &self.cfg
    }

    /// Whether a (batch, time, ·) sequence in `dtype` on `device` runs through the fused
    /// whole-layer LSTM op: an LSTM with f32 weights on the CPU (unless `WICK_OPS=reference`).
    fn fused(&self, dtype: DType, device: &Device) -> bool {
        let f32_weights = self.layers.iter().all(|l| l.w_ih.dtype() == DType::F32);
        self.cfg.cell == Cell::Lstm && crate::ops::fused_path(device) && dtype == DType::F32 && f32_weights
    }

    /// Runs `x` (batch, time, input) from `state` (zeros when `None`); returns the last layer's
    /// outputs (batch, time, hidden) and the final state of every layer.
    pub fn forward(&self, x: &Tensor, state: Option<&RnnState>, train: bool) -> Result<(Tensor, RnnState)> {
        if self.fused(x.dtype(), x.device()) {
            return self.forward_fused(x, state, train);
        }
        let steps = (0..x.dim(1)?).map(|t| x.narrow(1, t, 1)?.squeeze(1)).collect::<Result<Vec<_>>>()?;
        let (outputs, state) = self.forward_steps(steps, state, train)?;
        Ok((Tensor::stack(&outputs, 1)?, state))
    }

    /// [`Rnn::forward`] with one fused op per LSTM layer over the whole sequence.
    fn forward_fused(&self, x: &Tensor, state: Option<&RnnState>, train: bool) -> Result<(Tensor, RnnState)> {
        let mut input = x.clone();
        let (mut h_n, mut c_n) = (Vec::new(), Vec::new());
        for (k, layer) in self.layers.iter().enumerate() {
            let h0 = state.map(|s| s.h.get(k)).transpose()?;
            let c0 = state.and_then(|s| s.c.as_ref()).map(|c| c.get(k)).transpose()?;
            let weights = LstmWeights { w_ih: &layer.w_ih, w_hh: &layer.w_hh, b_ih: &layer.b_ih, b_hh: &layer.b_hh };
            let (outputs, h, c) = lstm_layer(&input, weights, h0.as_ref(), c0.as_ref())?;
            input = if k + 1 < self.layers.len() { crate::nn::dropout(&outputs, self.cfg.dropout, train)? } else { outputs };
            h_n.push(h);
            c_n.push(c);
        }
        Ok((input, RnnState { h: Tensor::stack(&h_n, 0)?, c: Some(Tensor::stack(&c_n, 0)?) }))
    }

    /// The outputs (batch, time, hidden) and final state for the token ids (batch, time) looked
    /// up in `embedding`: all at once for the fused LSTM, else one lookup per step.
    fn forward_ids(&self, embedding: &Embedding, ids: &Tensor, state: Option<&RnnState>, train: bool) -> Result<(Tensor, RnnState)> {
        let table = embedding.embeddings();
        if self.fused(table.dtype(), table.device()) {
            self.forward(&embedding.forward(ids)?, state, train)
        } else {
            let (steps, state) = self.forward_steps(embed_steps(embedding, ids)?, state, train)?;
            Ok((Tensor::stack(&steps, 1)?, state))
        }
    }

    /// The same on a sequence given as one (batch, input) tensor per time step.
    ///
    /// Time steps stay separate tensors all the way through: candle's backward pass of a slice
    /// materialises a gradient the size of the whole sliced tensor, so slicing one (time, ...)
    /// tensor per step would cost O(time²) memory traffic in the backward pass.
    pub fn forward_steps(&self, inputs: Vec<Tensor>, state: Option<&RnnState>, train: bool) -> Result<(Vec<Tensor>, RnnState)> {
        let Some(first) = inputs.first() else { candle_core::bail!("an RNN needs at least one time step") };
        let (b, dtype, device) = (first.dim(0)?, first.dtype(), first.device().clone());
        let hs = self.cfg.hidden_size;
        let zeros = || Tensor::zeros((b, hs), dtype, &device);
        let mut xs = inputs;
        let (mut h_n, mut c_n) = (Vec::new(), Vec::new());
        for (k, layer) in self.layers.iter().enumerate() {
            let mut h = match state {
                Some(s) => s.h.get(k)?,
                None => zeros()?,
            };
            let mut c = match (self.cfg.cell, state.and_then(|s| s.c.as_ref())) {
                (Cell::Lstm, Some(c)) => Some(c.get(k)?),
                (Cell::Lstm, None) => Some(zeros()?),
                (Cell::Gru, _) => None,
            };
            let (w_ih_t, w_hh_t) = (layer.w_ih.t()?, layer.w_hh.t()?);
            let lstm_bias = match self.cfg.cell {
                Cell::Lstm => Some((&layer.b_ih + &layer.b_hh)?),
                Cell::Gru => None,
            };
            let mut outputs = Vec::with_capacity(xs.len());
            for x in &xs {
                let xw = x.matmul(&w_ih_t)?;
                let hw = h.matmul(&w_hh_t)?;
                match self.cfg.cell {
                    Cell::Lstm => {
                        let gates = (xw + hw)?.broadcast_add(lstm_bias.as_ref().unwrap())?;
                        let (h_next, c_next) = crate::ops::lstm::lstm_cell(&gates, c.as_ref().unwrap())?;
                        h = h_next;
                        c = Some(c_next);
                    }
                    Cell::Gru => {
                        let xw = xw.broadcast_add(&layer.b_ih)?;
                        let hw = hw.broadcast_add(&layer.b_hh)?;
                        let rz = candle_nn::ops::sigmoid(&(xw.narrow(1, 0, 2 * hs)? + hw.narrow(1, 0, 2 * hs)?)?)?;
                        let (r, z) = (rz.narrow(1, 0, hs)?, rz.narrow(1, hs, hs)?);
                        let n = (xw.narrow(1, 2 * hs, hs)? + (r * hw.narrow(1, 2 * hs, hs)?)?)?.tanh()?;
                        // h' = (1 - z) * n + z * h = n + z * (h - n)
                        h = (&n + (z * (h - &n)?)?)?;
                    }
                }
                outputs.push(h.clone());
            }
            if k + 1 < self.layers.len() {
                outputs = outputs.iter().map(|o| crate::nn::dropout(o, self.cfg.dropout, train)).collect::<Result<_>>()?;
            }
            xs = outputs;
            h_n.push(h);
            if let Some(c) = c {
                c_n.push(c);
            }
        }
        let c = if c_n.is_empty() { None } else { Some(Tensor::stack(&c_n, 0)?) };
        Ok((xs, RnnState { h: Tensor::stack(&h_n, 0)?, c }))
    }
}

/// One embedding lookup per time step of `ids` (batch, time): see [`Rnn::forward_steps`].
fn embed_steps(embedding: &Embedding, ids: &Tensor) -> Result<Vec<Tensor>> {
    (0..ids.dim(1)?).map(|t| embedding.forward(&ids.narrow(1, t, 1)?.squeeze(1)?)).collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CharRnnConfig {
    pub vocab_size: usize,
    pub embedding_size: usize,
    pub rnn: RnnConfig,
    /// Dropout on the RNN's outputs before the head, in training.
    #[serde(default)]
    pub dropout: f64,
}

impl CharRnnConfig {
    pub fn new(cell: Cell, vocab_size: usize, embedding_size: usize, hidden_size: usize, num_layers: usize) -> Self {
        let rnn = RnnConfig { cell, input_size: embedding_size, hidden_size, num_layers, dropout: 0.0 };
        Self { vocab_size, embedding_size, rnn, dropout: 0.0 }
    }
}

/// `embedding` → `rnn` → `head`: next-character logits (batch, time, vocab).
pub struct CharRnn {
    embedding: Embedding,
    rnn: Rnn,
    /// One fused GEMM with the bias for all positions (`head.weight`, `head.bias`).
    head: Dense,
    dropout: f64,
}

impl CharRnn {
    pub fn load(vb: VarBuilder, cfg: &CharRnnConfig) -> Result<Self> {
        Ok(Self {
            embedding: embedding(cfg.vocab_size, cfg.embedding_size, vb.pp("embedding"))?,
            rnn: Rnn::load(vb.pp("rnn"), &cfg.rnn)?,
            head: Dense::load(vb.pp("head"), cfg.rnn.hidden_size, cfg.vocab_size)?,
            dropout: cfg.dropout,
        })
    }

    /// Logits for every position and the state to continue from (for sampling).
    pub fn forward_with_state(&self, ids: &Tensor, state: Option<&RnnState>, train: bool) -> Result<(Tensor, RnnState)> {
        let (outputs, state) = self.rnn.forward_ids(&self.embedding, ids, state, train)?;
        let out = crate::nn::dropout(&outputs, self.dropout, train)?;
        Ok((self.head.forward(&out)?, state))
    }

    /// Samples `len` characters after `prompt` (ids) with temperature `temperature` (0 =
    /// greedy), seeded from `rng`; returns the new ids. A shorthand for [`crate::generate`], which
    /// also has top-k, top-p, a repetition penalty and streaming.
    pub fn sample(&self, prompt: &[u32], len: usize, temperature: f64, rng: &mut impl rand::Rng) -> anyhow::Result<Vec<u32>> {
        if prompt.is_empty() {
            anyhow::bail!("sampling needs a prompt of at least one character");
        }
        let config = GenerationConfig { max_new_tokens: len, temperature, seed: rng.random(), ..Default::default() };
        Ok(crate::generate::generate(self, &[prompt.to_vec()], &config, None, None)?.generated_ids.remove(0))
    }
}

/// Generation (`wick::generate`): the cache is the recurrent state, and a step costs the same
/// at any length. An RNN has no positions, and padding must not enter the state: a batch with
/// padding runs each row alone on its real tokens (only the prompt pass of a left-padded batch
/// has any).
impl CausalLm for CharRnn {
    type Cache = Option<RnnState>;

    fn new_cache(&self, _batch: usize, _capacity: usize) -> anyhow::Result<Self::Cache> {
        Ok(None)
    }

    fn forward_last(&self, ids: &Tensor, _positions: &Tensor, mask: &Tensor, cache: &mut Self::Cache) -> anyhow::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mask = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let last = |logits: Tensor| logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1);
        if mask.iter().flatten().all(|&m| m != 0) {
            let (logits, state) = self.forward_with_state(ids, cache.as_ref(), false)?;
            *cache = Some(state);
            return Ok(last(logits)?);
        }
        let (mut logits, mut states) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for (r, row_mask) in mask.iter().enumerate() {
            let real: Vec<u32> = (0..t as u32).filter(|&j| row_mask[j as usize] != 0).collect();
            if real.is_empty() {
                anyhow::bail!("row {r} of the batch has no tokens (its attention mask is all 0)");
            }
            let row_ids = ids.get(r)?.index_select(&Tensor::new(real, ids.device())?, 0)?.unsqueeze(0)?;
            let state = cache.as_ref().map(|s| s.row(r)).transpose()?;
            let (row_logits, row_state) = self.forward_with_state(&row_ids, state.as_ref(), false)?;
            logits.push(last(row_logits)?);
            states.push(row_state);
        }
        *cache = Some(RnnState::cat_rows(&states)?);
        Ok(Tensor::cat(&logits, 0)?)
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }

    fn device(&self) -> &Device {
        self.head.weight.device()
    }
}

impl ModuleT for CharRnn {
    fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_with_state(ids, None, train)?.0)
    }
}

/// `embedding` → `rnn` → `head` on the last layer's final hidden state: class logits.
pub struct RnnClassifier {
    embedding: Embedding,
    rnn: Rnn,
    head: Dense,
}

impl RnnClassifier {
    pub fn load(vb: VarBuilder, vocab_size: usize, rnn: &RnnConfig, num_classes: usize) -> Result<Self> {
        Ok(Self {
            embedding: embedding(vocab_size, rnn.input_size, vb.pp("embedding"))?,
            rnn: Rnn::load(vb.pp("rnn"), rnn)?,
            head: Dense::load(vb.pp("head"), rnn.hidden_size, num_classes)?,
        })
    }
}

impl ModuleT for RnnClassifier {
    fn forward_t(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let (_, state) = self.rnn.forward_ids(&self.embedding, ids, None, train)?;
        let last = state.h.get(state.h.dim(0)? - 1)?;
        self.head.forward(&last)
    }
}

/// Saved and loaded as a wick model folder (`model_type: "wick-char-rnn"`).
impl crate::pretrained::Pretrained for CharRnn {
    type Config = CharRnnConfig;
    const MODEL_TYPES: &'static [&'static str] = &["wick-char-rnn"];
    const ARCHITECTURE: &'static str = "CharRnn";
    fn build(vb: VarBuilder, config: &CharRnnConfig) -> Result<Self> {
        Self::load(vb, config)
    }
}

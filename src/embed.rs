//! Sentence embeddings as sentence-transformers computes them for BERT-family encoders such as
//! all-MiniLM-L6-v2: tokens through the encoder, the mean of the token vectors over the real
//! (unpadded) tokens, then L2-normalised when the folder's `modules.json` lists a `Normalize`
//! module. The longest input is `sentence_bert_config.json`'s `max_seq_length` (longer texts are
//! cut, as sentence-transformers does), else the model's position limit.

use crate::models::bert::{self, BertModel};
use crate::weights::ModelFiles;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

pub struct SentenceEmbedder {
    model: BertModel,
    config: bert::Config,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    /// Tokens per text at most (longer texts are cut).
    pub max_len: usize,
    /// Whether vectors are scaled to unit length.
    pub normalize: bool,
}

impl SentenceEmbedder {
    /// Loads the encoder, tokenizer and pooling settings of a model folder.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let (mut model, config) = crate::pretrained::load::<BertModel>(files, dtype, device)?;
        crate::pretrained::pack_for_inference(&mut model, crate::ops::linear::Panels::ManyRows)?;
        Self::with_encoder(files, model, config, device)
    }

    /// An embedder on an encoder already loaded from `files` (a classifier's, which then
    /// shares its weights), with the folder's tokenizer and pooling settings.
    pub fn with_encoder(files: &ModelFiles, model: BertModel, config: bert::Config, device: &Device) -> Result<Self> {
        let tokenizer = files.tokenizer()?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let path = files.dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
        };
        let limit = config.max_position_embeddings;
        let max_len = match read_json("sentence_bert_config.json")?.and_then(|v| v["max_seq_length"].as_u64()) {
            Some(n) => (n as usize).min(limit),
            None => limit,
        };
        let normalize = read_json("modules.json")?
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|modules| modules.iter().any(|m| m["type"].as_str().is_some_and(|t| t.ends_with(".Normalize"))));
        if let Some(pooling) = read_json("1_Pooling/config.json")? {
            if pooling["pooling_mode_mean_tokens"].as_bool() == Some(false) {
                bail!("{}: only mean pooling is supported (1_Pooling/config.json asks for another mode)", files.dir.display());
            }
        }
        Ok(Self { model, config, tokenizer, device: device.clone(), max_len, normalize })
    }

    /// The vector size.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// One vector per text, in order, with each text's token count (after cutting).
    pub fn embed(&self, texts: &[&str]) -> Result<Embedded> {
        let batch = crate::tokenizer::encode_batch(&self.tokenizer, texts, self.max_len, self.config.pad_token_id, &self.device)?;
        let out = self.model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&batch.token_type_ids), false)?;
        let mut pooled = bert::mean_pool(&out.last_hidden_state, &batch.attention_mask)?;
        if self.normalize {
            pooled = bert::l2_normalize(&pooled)?;
        }
        let tokens = batch.attention_mask.to_dtype(DType::U32)?.sum(1)?.to_vec1::<u32>()?;
        Ok(Embedded { vectors: pooled.to_dtype(DType::F32)?.to_vec2::<f32>()?, tokens: tokens.into_iter().map(|n| n as usize).collect(), truncated: batch.truncated })
    }
}

/// What [`SentenceEmbedder::embed`] gives for a batch of texts.
pub struct Embedded {
    /// One vector per text, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens each text became (special tokens included, after cutting to `max_len`).
    pub tokens: Vec<usize>,
    /// How many texts were cut to `max_len` tokens.
    pub truncated: usize,
}

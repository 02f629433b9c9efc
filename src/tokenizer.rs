//! Tokenizers from Hugging Face model folders, and batch encoding into padded id tensors.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{EncodeInput, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::PostProcessor;

/// The tokenizer of the model folder `dir`: `tokenizer.json`, else WordPiece from `vocab.txt`
/// (BERT), else byte-level BPE from `vocab.json` + `merges.txt` (GPT-2). Padding and truncation
/// a `tokenizer.json` may carry are switched off (MiniLM's pads everything to 128 tokens).
pub fn load(dir: &Path) -> Result<Tokenizer> {
    for name in crate::weights::TOKENIZER_FILES {
        crate::weights::check_inside(dir, &dir.join(name))?;
    }
    let json = dir.join("tokenizer.json");
    let mut tokenizer = if json.is_file() {
        Tokenizer::from_file(&json).map_err(|e| anyhow!("{}: {e}", json.display()))?
    } else if dir.join("vocab.txt").is_file() {
        wordpiece(dir)?
    } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
        byte_level_bpe(dir)?
    } else {
        bail!("{}: no tokenizer (tokenizer.json, vocab.txt, or vocab.json + merges.txt)", dir.display());
    };
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
    Ok(tokenizer)
}

/// `tokenizer_config.json` as JSON (empty when absent).
fn tokenizer_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(serde_json::json!({}));
    }
    let text = std::fs::read_to_string(&path)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn wordpiece(dir: &Path) -> Result<Tokenizer> {
    let config = tokenizer_config(dir)?;
    let flag = |key: &str, default: bool| config.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    let token = |key: &str, default: &str| config.get(key).and_then(|v| v.as_str()).unwrap_or(default).to_string();
    let lowercase = flag("do_lower_case", true);
    let (unk, cls, sep) = (token("unk_token", "[UNK]"), token("cls_token", "[CLS]"), token("sep_token", "[SEP]"));
    let vocab = dir.join("vocab.txt");
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token(unk)
        .build()
        .map_err(|e| anyhow!("{}: {e}", vocab.display()))?;
    let id = |t: &str| model_token_id(&model, t).with_context(|| format!("{}: no {t} token", vocab.display()));
    let processing = BertProcessing::new((sep.clone(), id(&sep)?), (cls.clone(), id(&cls)?));
    let mut tokenizer = Tokenizer::new(model);
    let strip_accents = config.get("strip_accents").and_then(|v| v.as_bool());
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, flag("tokenize_chinese_chars", true), strip_accents, lowercase)))
        .map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(processing));
    tokenizer.with_decoder(Some(WordPieceDecoder::default()));
    Ok(tokenizer)
}

fn model_token_id(model: &WordPiece, token: &str) -> Option<u32> {
    use tokenizers::Model;
    model.token_to_id(token)
}

fn byte_level_bpe(dir: &Path) -> Result<Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| anyhow!("{} / {}: {e}", vocab.display(), merges.display()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// A padded batch of token ids, as a BERT-style model takes it.
pub struct EncodedBatch {
    /// (batch, seq) u32
    pub input_ids: Tensor,
    /// (batch, seq) u32, 0 for padding
    pub attention_mask: Tensor,
    /// (batch, seq) u32
    pub token_type_ids: Tensor,
    /// How many inputs were cut at `max_len`.
    pub truncated: usize,
}

/// Token ids and token type ids of one text.
pub type Tokens = (Vec<u32>, Vec<u32>);

/// Encodes `texts` with special tokens, each cut to `max_len` tokens in all: the text is
/// shortened before the special tokens are added, so BERT's closing `[SEP]` is always there.
/// Also returns how many texts were cut.
pub fn encode_truncated(tokenizer: &Tokenizer, texts: &[&str], max_len: usize) -> Result<(Vec<Tokens>, usize)> {
    encode_inputs(tokenizer, texts.iter().map(|&t| EncodeInput::from(t)).collect(), false, max_len)
}

/// Encodes sentence pairs as segment A (`texts`, token type 0) and segment B (`pairs`, token
/// type 1), `[CLS] A [SEP] B [SEP]` for BERT, cut to `max_len` tokens in all by removing
/// tokens from the longer segment first: transformers' `truncation=True` ("longest_first").
/// Also returns how many pairs were cut.
pub fn encode_pairs_truncated(tokenizer: &Tokenizer, texts: &[&str], pairs: &[&str], max_len: usize) -> Result<(Vec<Tokens>, usize)> {
    if texts.len() != pairs.len() {
        bail!("{} texts but {} second texts of a pair", texts.len(), pairs.len());
    }
    let inputs = texts.iter().zip(pairs).map(|(&a, &b)| EncodeInput::from((a, b))).collect();
    encode_inputs(tokenizer, inputs, true, max_len)
}

/// The shared body of [`encode_truncated`] and [`encode_pairs_truncated`]: the tokenizer's own
/// truncation (the algorithm transformers' fast tokenizers run), on a copy of `tokenizer` so
/// the caller's stays untouched.
fn encode_inputs(tokenizer: &Tokenizer, inputs: Vec<EncodeInput>, is_pair: bool, max_len: usize) -> Result<(Vec<Tokens>, usize)> {
    let special = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(is_pair));
    // Checked here: the tokenizers crate subtracts the special tokens from the maximum unchecked.
    if max_len < special.max(1) {
        bail!("max length {max_len} leaves no room for the text between the {special} special tokens");
    }
    let mut tokenizer = tokenizer.clone();
    let truncation = TruncationParams { max_length: max_len, strategy: TruncationStrategy::LongestFirst, stride: 0, direction: TruncationDirection::Right };
    tokenizer.with_truncation(Some(truncation)).map_err(|e| anyhow!("{e}"))?;
    let encodings = tokenizer.encode_batch(inputs, true).map_err(|e| anyhow!("tokenizing: {e}"))?;
    let truncated = encodings.iter().filter(|e| !e.get_overflowing().is_empty()).count();
    let rows = encodings.iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).collect();
    Ok((rows, truncated))
}

/// Right-pads rows to the longest with `pad_id`: (input_ids, attention_mask, token_type_ids).
pub fn pad_right(rows: &[&Tokens], pad_id: u32, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let seq = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(1);
    let n = rows.len() * seq;
    let (mut ids, mut mask, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (row_ids, row_types) in rows {
        let pad = seq - row_ids.len();
        ids.extend(row_ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        types.extend(row_types.iter().copied().chain(std::iter::repeat_n(0, pad)));
        mask.extend(std::iter::repeat_n(1u32, row_ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    let shape = (rows.len(), seq);
    Ok((Tensor::from_vec(ids, shape, device)?, Tensor::from_vec(mask, shape, device)?, Tensor::from_vec(types, shape, device)?))
}

/// Encodes `texts` (see [`encode_truncated`]) and right-pads them with `pad_id`.
pub fn encode_batch(tokenizer: &Tokenizer, texts: &[&str], max_len: usize, pad_id: u32, device: &Device) -> Result<EncodedBatch> {
    if texts.is_empty() {
        bail!("no texts to encode");
    }
    let (rows, truncated) = encode_truncated(tokenizer, texts, max_len)?;
    let (input_ids, attention_mask, token_type_ids) = pad_right(&rows.iter().collect::<Vec<_>>(), pad_id, device)?;
    Ok(EncodedBatch { input_ids, attention_mask, token_type_ids, truncated })
}

//! Text generation for any causal language model with a KV cache ([`CausalLm`]): greedy
//! decoding or sampling (temperature, top-k, top-p), a repetition penalty, stop on EOS or on
//! stop strings, batches of prompts (left-padded, as transformers does), seeded, with a
//! streaming callback that never splits a multi-byte UTF-8 character.
//!
//! The logits processing follows transformers' `generate` order and semantics: repetition
//! penalty on the raw logits (positive logits divided by the penalty, negative ones multiplied,
//! for every token id already in the row: prompt and generated, padding excluded), then
//! temperature, top-k, top-p (the smallest set of most likely tokens whose probabilities reach
//! `top_p`, at least one), then a draw. `temperature == 0` is greedy (argmax after the penalty).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// A causal LM that decodes with a cache.
pub trait CausalLm {
    type Cache;

    /// A fresh cache for `batch` rows with room for `capacity` positions.
    fn new_cache(&self, batch: usize, capacity: usize) -> Result<Self::Cache>;

    /// Logits (batch, vocab) after the last column of `ids` (batch, seq) u32, given positions
    /// (batch, seq) u32 and the attention mask of these new tokens (batch, seq) u32 (1 = token,
    /// 0 = padding); the tokens are appended to `cache`.
    fn forward_last(&self, ids: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut Self::Cache) -> Result<Tensor>;

    /// The longest sequence (positions) the model can take, if limited.
    fn max_positions(&self) -> Option<usize>;

    fn device(&self) -> &Device;
}

impl CausalLm for crate::models::gpt2::GPT2LMHeadModel {
    type Cache = crate::models::gpt2::KvCache;

    fn new_cache(&self, _batch: usize, capacity: usize) -> Result<Self::Cache> {
        Ok(self.transformer.new_cache(capacity))
    }

    fn forward_last(&self, ids: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut Self::Cache) -> Result<Tensor> {
        Ok(crate::models::gpt2::GPT2LMHeadModel::forward_last(self, ids, Some(positions), Some(mask), Some(cache))?)
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config().n_positions)
    }

    fn device(&self) -> &Device {
        self.transformer.device()
    }
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy; otherwise the logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only among the `k` most likely tokens (0 or None = all).
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to `p` (1 = all).
    pub top_p: Option<f64>,
    /// transformers' repetition penalty (1 = none).
    pub repetition_penalty: f64,
    /// A row ends when it produces one of these (the EOS token is kept in its ids).
    pub eos_token_ids: Vec<u32>,
    /// What finished rows emit, and what prompts are left-padded with.
    pub pad_token_id: u32,
    /// A row ends once its generated text contains one of these (kept in the text, as
    /// transformers' `stop_strings`). Needs a tokenizer.
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 50,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            eos_token_ids: vec![],
            pad_token_id: 0,
            stop_strings: vec![],
            seed: 42,
        }
    }
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, ..Default::default() }
    }

    fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be >= 0 (0 = greedy), got {}", self.temperature)
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top_p must be in (0, 1], got {p}")
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!("repetition_penalty must be > 0, got {}", self.repetition_penalty)
        }
        Ok(())
    }
}

/// Why a row stopped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

/// What [`generate`] produced.
#[derive(Clone, Debug)]
pub struct GenerationOutput {
    /// The prompts' ids (unpadded).
    pub prompt_ids: Vec<Vec<u32>>,
    /// The new tokens of each row (up to and including EOS; no padding).
    pub generated_ids: Vec<Vec<u32>>,
    /// The decoded new tokens of each row (empty without a tokenizer).
    pub texts: Vec<String>,
    pub finish_reasons: Vec<FinishReason>,
    /// Tokens generated over all rows.
    pub new_tokens: usize,
    /// The prompt pass (which also yields each row's first new token).
    pub prefill_seconds: f64,
    pub seconds: f64,
    /// `new_tokens / seconds`, prompt pass included.
    pub tokens_per_s: f64,
    /// Tokens per second of the decoding steps alone (after the prompt pass).
    pub decode_tokens_per_s: f64,
}

/// Text as it is produced, without breaking multi-byte characters: the full new-token sequence
/// is decoded each time and only the stable new suffix is released (a trailing U+FFFD, an
/// incomplete UTF-8 sequence so far, is held back until the next token completes it).
pub struct TextStream {
    emitted: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self { emitted: 0 }
    }

    /// The new stable text given the decoding of every token so far.
    pub fn push(&mut self, full: &str) -> Option<String> {
        let stable = full.trim_end_matches('\u{FFFD}');
        self.release(full, stable.len())
    }

    /// Whatever is left at the end (including a trailing U+FFFD that never completed).
    pub fn finish(&mut self, full: &str) -> Option<String> {
        self.release(full, full.len())
    }

    fn release(&mut self, full: &str, upto: usize) -> Option<String> {
        if upto <= self.emitted || !full.is_char_boundary(self.emitted) {
            return None;
        }
        let out = full[self.emitted..upto].to_string();
        self.emitted = upto;
        Some(out)
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

/// Called with (row, new text) as text becomes stable.
pub type OnText<'a> = dyn FnMut(usize, &str) + 'a;

fn decode(tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
}

/// Encodes prompts for generation (no special tokens added, as transformers' GPT-2 does).
pub fn encode_prompts(tokenizer: &tokenizers::Tokenizer, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| Ok(tokenizer.encode(*p, true).map_err(|e| anyhow::anyhow!("tokenizing {p:?}: {e}"))?.get_ids().to_vec()))
        .collect()
}

/// Left-pads `rows` with `pad` to the longest: (ids, mask, positions = cumsum(mask) - 1 clamped
/// at 0), each flattened row-major, and the padded length.
pub fn left_pad(rows: &[Vec<u32>], pad: u32) -> (Vec<u32>, Vec<u32>, Vec<u32>, usize) {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask, mut pos) = (vec![], vec![], vec![]);
    for row in rows {
        let p = t - row.len();
        ids.extend(std::iter::repeat_n(pad, p).chain(row.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, p).chain(std::iter::repeat_n(1, row.len())));
        pos.extend(std::iter::repeat_n(0u32, p).chain(0..row.len() as u32));
    }
    (ids, mask, pos, t)
}

/// Generates from `prompts` (token ids, one row each). With a `tokenizer`, texts are decoded,
/// stop strings checked and `on_text` called as text becomes stable.
pub fn generate<M: CausalLm>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    tokenizer: Option<&tokenizers::Tokenizer>,
    mut on_text: Option<&mut OnText<'_>>,
) -> Result<GenerationOutput> {
    config.check()?;
    if prompts.is_empty() {
        bail!("no prompts")
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty: GPT-2-style models need at least one token to start from (e.g. the BOS/EOS token)")
    }
    if !config.stop_strings.is_empty() && tokenizer.is_none() {
        bail!("stop strings need a tokenizer")
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    if let Some(ctx) = model.max_positions() {
        if longest > ctx {
            bail!("the prompt has {longest} tokens but the model's context is {ctx} positions: shorten the prompt")
        }
        // The last new token is sampled but never fed back: prompt + new - 1 positions must fit.
        if longest.saturating_add(config.max_new_tokens) > ctx + 1 {
            bail!(
                "the prompt ({longest} tokens) plus max_new_tokens ({}) exceeds the model's context of {ctx} positions: ask for at most {} new tokens",
                config.max_new_tokens,
                ctx + 1 - longest
            )
        }
    }
    let device = model.device().clone();
    let b = prompts.len();
    let start = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut generated: Vec<Vec<u32>> = vec![vec![]; b];
    let mut finish: Vec<Option<FinishReason>> = vec![None; b];
    let mut texts = vec![String::new(); b];
    let mut streams: Vec<TextStream> = (0..b).map(|_| TextStream::new()).collect();
    // Token ids seen per row, for the repetition penalty.
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut prefill_seconds = 0.0;

    if config.max_new_tokens > 0 {
        let (ids, mask, pos, t) = left_pad(prompts, config.pad_token_id);
        let mut cache = model.new_cache(b, t + config.max_new_tokens)?;
        let mut logits = model.forward_last(
            &Tensor::from_vec(ids, (b, t), &device)?,
            &Tensor::from_vec(pos, (b, t), &device)?,
            &Tensor::from_vec(mask, (b, t), &device)?,
            &mut cache,
        )?;
        for step in 0..config.max_new_tokens {
            let mut rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            if step == 0 {
                prefill_seconds = start.elapsed().as_secs_f64();
            }
            let mut next = vec![config.pad_token_id; b];
            for r in 0..b {
                if finish[r].is_some() {
                    continue;
                }
                let token = choose(std::mem::take(&mut rows[r]), &seen[r], config, &mut rng)?;
                next[r] = token;
                generated[r].push(token);
                seen[r].push(token);
                if config.eos_token_ids.contains(&token) {
                    finish[r] = Some(FinishReason::Eos);
                }
                if let Some(tok) = tokenizer {
                    let text = decode(tok, &generated[r])?;
                    if let Some(cb) = on_text.as_deref_mut() {
                        if let Some(new) = streams[r].push(&text) {
                            cb(r, &new);
                        }
                    }
                    if finish[r].is_none() && config.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                        finish[r] = Some(FinishReason::StopString);
                    }
                    texts[r] = text;
                }
            }
            if finish.iter().all(Option::is_some) || step + 1 == config.max_new_tokens {
                break;
            }
            let pos: Vec<u32> = next_pos.clone();
            for p in next_pos.iter_mut() {
                *p += 1;
            }
            logits = model.forward_last(
                &Tensor::from_vec(next, (b, 1), &device)?,
                &Tensor::from_vec(pos, (b, 1), &device)?,
                &Tensor::ones((b, 1), candle_core::DType::U32, &device)?,
                &mut cache,
            )?;
        }
    }
    if let Some(cb) = on_text.as_deref_mut() {
        for r in 0..b {
            if let Some(rest) = streams[r].finish(&texts[r]) {
                cb(r, &rest);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let new_tokens: usize = generated.iter().map(Vec::len).sum();
    let decode_seconds = seconds - prefill_seconds;
    Ok(GenerationOutput {
        prompt_ids: prompts.to_vec(),
        generated_ids: generated,
        texts,
        finish_reasons: finish.into_iter().map(|f| f.unwrap_or(FinishReason::Length)).collect(),
        new_tokens,
        prefill_seconds,
        seconds,
        tokens_per_s: new_tokens as f64 / seconds.max(1e-9),
        decode_tokens_per_s: new_tokens.saturating_sub(b) as f64 / decode_seconds.max(1e-9),
    })
}

/// Generates from text prompts: encodes them, generates, decodes.
pub fn generate_text<M: CausalLm>(
    model: &M,
    tokenizer: &tokenizers::Tokenizer,
    prompts: &[&str],
    config: &GenerationConfig,
    on_text: Option<&mut OnText<'_>>,
) -> Result<GenerationOutput> {
    let ids = encode_prompts(tokenizer, prompts)?;
    generate(model, &ids, config, Some(tokenizer), on_text).context("generating")
}

/// Applies the penalty, temperature, top-k and top-p to one row of logits and picks a token.
pub fn choose(mut logits: Vec<f32>, seen: &[u32], config: &GenerationConfig, rng: &mut impl Rng) -> Result<u32> {
    let vocab = logits.len();
    if config.repetition_penalty != 1.0 {
        let penalty = config.repetition_penalty as f32;
        let mut done = vec![false; vocab];
        for &id in seen {
            let i = id as usize;
            if i < vocab && !done[i] {
                done[i] = true;
                let l = logits[i];
                logits[i] = if l < 0.0 { l * penalty } else { l / penalty };
            }
        }
    }
    if config.temperature == 0.0 {
        return argmax(&logits).context("all logits are NaN");
    }
    let inv_t = 1.0 / config.temperature;
    // Candidates sorted by logit, most likely first (ties: lower id first, as a stable sort).
    // Sorted as one u64 key each (logit rank, then id): several times faster than comparing
    // through the logits, which matters when a server samples many rows per step.
    let mut keys: Vec<u64> = (0..vocab).filter(|&i| !logits[i].is_nan()).map(|i| (descending_rank(logits[i]) as u64) << 32 | i as u64).collect();
    if keys.is_empty() {
        bail!("all logits are NaN")
    }
    // With top-k, only the k best are sorted (the order is total, so they are the same k).
    if let Some(k) = config.top_k.filter(|&k| k > 0 && k < keys.len()) {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    keys.sort_unstable();
    let mut order: Vec<usize> = keys.iter().map(|&key| (key & 0xffff_ffff) as usize).collect();
    let max = logits[order[0]] as f64 * inv_t;
    let mut probs: Vec<f64> = order.iter().map(|&i| (logits[i] as f64 * inv_t - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = config.top_p.filter(|&p| p < 1.0) {
        let mut cum = 0.0;
        let mut keep = 0;
        for p in &probs {
            keep += 1;
            cum += p;
            if cum >= top_p {
                break;
            }
        }
        order.truncate(keep.max(1));
        probs.truncate(keep.max(1));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u: f64 = rng.random();
    let mut cum = 0.0;
    for (p, &i) in probs.iter().zip(&order) {
        cum += p;
        if u < cum {
            return Ok(i as u32);
        }
    }
    Ok(*order.last().unwrap() as u32)
}

/// A u32 that orders non-NaN floats from the largest to the smallest (-0 and +0 equal).
fn descending_rank(x: f32) -> u32 {
    let bits = (x + 0.0).to_bits();
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
    !ascending
}

fn argmax(v: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_holds_back_incomplete_characters() {
        let mut s = TextStream::new();
        assert_eq!(s.push("ab").as_deref(), Some("ab"));
        assert_eq!(s.push("ab\u{FFFD}"), None);
        assert_eq!(s.push("abé").as_deref(), Some("é"));
        assert_eq!(s.push("abé\u{FFFD}"), None);
        assert_eq!(s.finish("abé\u{FFFD}").as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn penalty_and_filters_follow_transformers() {
        let cfg = GenerationConfig { repetition_penalty: 2.0, ..Default::default() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        // token 0 (2.0 → 1.0) loses to token 1 (1.5); negative logits are multiplied.
        assert_eq!(choose(vec![2.0, 1.5, -1.0], &[0], &cfg, &mut rng).unwrap(), 1);
        assert_eq!(choose(vec![-0.5, -0.6, -1.0], &[0], &cfg, &mut rng).unwrap(), 1);
        // top-k 1 and a tiny top-p are greedy whatever the temperature.
        for cfg in [
            GenerationConfig { temperature: 5.0, top_k: Some(1), ..Default::default() },
            GenerationConfig { temperature: 5.0, top_p: Some(1e-6), ..Default::default() },
        ] {
            for _ in 0..20 {
                assert_eq!(choose(vec![0.1, 3.0, 0.2, 2.9], &[], &cfg, &mut rng).unwrap(), 1);
            }
        }
        // top-p 0.5 over probabilities (0.4, 0.35, 0.25) keeps the first two.
        let logits: Vec<f32> = [0.4f32, 0.35, 0.25].iter().map(|p| p.ln()).collect();
        let cfg = GenerationConfig { temperature: 1.0, top_p: Some(0.5), ..Default::default() };
        let picks: std::collections::BTreeSet<u32> = (0..200).map(|_| choose(logits.clone(), &[], &cfg, &mut rng).unwrap()).collect();
        assert_eq!(picks.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn key_order_is_the_comparison_order() {
        let logits = [0.5f32, -0.0, 0.0, f32::INFINITY, -1e-30, 1e-30, f32::NEG_INFINITY, 0.5, -3.0, 7.25, -0.0, f32::MIN, f32::MAX];
        let mut by_comparison: Vec<usize> = (0..logits.len()).collect();
        by_comparison.sort_by(|a, b| logits[*b].partial_cmp(&logits[*a]).unwrap().then(a.cmp(b)));
        let mut keys: Vec<u64> = (0..logits.len()).map(|i| (descending_rank(logits[i]) as u64) << 32 | i as u64).collect();
        keys.sort_unstable();
        let by_key: Vec<usize> = keys.iter().map(|k| (k & 0xffff_ffff) as usize).collect();
        assert_eq!(by_key, by_comparison);
    }

    #[test]
    fn left_padding_positions() {
        let (ids, mask, pos, t) = left_pad(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(t, 3);
        assert_eq!(ids, vec![5, 6, 7, 0, 0, 8]);
        assert_eq!(mask, vec![1, 1, 1, 0, 0, 1]);
        assert_eq!(pos, vec![0, 1, 2, 0, 0, 0]);
    }
}

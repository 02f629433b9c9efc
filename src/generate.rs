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

    /// Logits (batch, vocab), in any float dtype (f32 spares generation a conversion), after
    /// the last column of `ids` (batch, seq) u32, given positions
    /// (batch, seq) u32 and the attention mask of these new tokens (batch, seq) u32 (1 = token,
    /// 0 = padding); the tokens are appended to `cache`.
    fn forward_last(&self, ids: &Tensor, positions: &Tensor, mask: &Tensor, cache: &mut Self::Cache) -> Result<Tensor>;

    /// The longest sequence (positions) the model can take, if limited.
    fn max_positions(&self) -> Option<usize>;

    fn device(&self) -> &Device;
}

/// Turns token ids back into text: a Hugging Face tokenizer (special tokens skipped), or a
/// character vocabulary.
pub trait Detokenize {
    fn detokenize(&self, ids: &[u32]) -> Result<String>;
}

impl Detokenize for tokenizers::Tokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.decode(ids, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }
}

impl Detokenize for crate::data::chars::CharCorpus {
    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        Ok(self.decode(ids))
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

/// Text as it is produced, token by token, without breaking multi-byte characters, and without
/// decoding the whole output at every step (which costs O(n²) in the output length): each step
/// decodes a short window of recent tokens twice, the tokens whose text was released last (as
/// context: decoders drop a leading space or join word pieces depending on what precedes) with
/// and without the tokens since, and releases the difference once it is stable (an incomplete
/// UTF-8 sequence decodes to a trailing U+FFFD and is held back until a later token completes
/// it). The window then restarts at the tokens just released. (Text Generation Inference
/// streams the same way.)
#[derive(Debug, Default)]
pub struct TextStream {
    /// The window: `ids[..context]` decode to text already released, the rest is not released.
    ids: Vec<u32>,
    context: usize,
    /// Everything released so far.
    text: String,
    /// The decoding of the unreleased tokens (may end in U+FFFD).
    held: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next token; returns the text that became stable, if any.
    pub fn push(&mut self, decoder: &dyn Detokenize, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.release(decoder, false)
    }

    /// Whatever is left at the end (including a trailing U+FFFD that never completed).
    pub fn finish(&mut self, decoder: &dyn Detokenize) -> Result<Option<String>> {
        self.release(decoder, true)
    }

    /// The text released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The decoded text not released yet (it may end in U+FFFD): after [`TextStream::text`],
    /// everything decoded so far.
    pub fn held(&self) -> &str {
        &self.held
    }

    fn release(&mut self, decoder: &dyn Detokenize, at_end: bool) -> Result<Option<String>> {
        let before = decoder.detokenize(&self.ids[..self.context])?;
        let now = decoder.detokenize(&self.ids)?;
        // A decoder whose output for the window does not extend its context's (none of the
        // Hugging Face ones) keeps the tokens held until it does.
        let extends = now.len() > before.len() && now.starts_with(&before);
        self.held = if extends { now[before.len()..].to_string() } else { String::new() };
        if !extends || (!at_end && now.ends_with('\u{FFFD}')) {
            return Ok(None);
        }
        let new = std::mem::take(&mut self.held);
        self.text.push_str(&new);
        self.ids.drain(..self.context);
        self.context = self.ids.len();
        Ok(Some(new))
    }
}

/// Called with (row, new text) as text becomes stable.
pub type OnText<'a> = dyn FnMut(usize, &str) + 'a;

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

/// Generates from `prompts` (token ids, one row each). With a `tokenizer` (a Hugging Face
/// tokenizer, a character vocabulary), texts are decoded, stop strings checked and `on_text`
/// called as text becomes stable.
pub fn generate<M: CausalLm>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    tokenizer: Option<&dyn Detokenize>,
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
                    let released_before = streams[r].text().len();
                    if let Some(new) = streams[r].push(tok, token)? {
                        if let Some(cb) = on_text.as_deref_mut() {
                            cb(r, &new);
                        }
                    }
                    if finish[r].is_none() && contains_stop_string(&streams[r], released_before, &config.stop_strings) {
                        finish[r] = Some(FinishReason::StopString);
                    }
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
    if let Some(tok) = tokenizer {
        for r in 0..b {
            if let (Some(rest), Some(cb)) = (streams[r].finish(tok)?, on_text.as_deref_mut()) {
                cb(r, &rest);
            }
            texts[r] = tok.detokenize(&generated[r])?;
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

/// Whether the text of `stream` (released and held) contains one of `stops` that it did not
/// contain before the last token: only the part that can have changed is searched (from
/// `released_before`, the released length before that token, less a stop string's length), so
/// the check costs O(1) per token, not O(text).
fn contains_stop_string(stream: &TextStream, released_before: usize, stops: &[String]) -> bool {
    let Some(longest) = stops.iter().map(String::len).max() else { return false };
    let text = stream.text();
    let mut from = released_before.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let tail = format!("{}{}", &text[from..], stream.held());
    stops.iter().any(|s| tail.contains(s.as_str()))
}

/// Applies the penalty, temperature, top-k and top-p to one row of logits and picks a token
/// with one draw u of `rng`: the first candidate whose cumulative probability passes u, over the
/// whole vocabulary in id order, or over the candidates top-k / top-p keep, most likely first.
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
    let best = argmax(&logits).context("all logits are NaN")? as usize;
    let (max, inv_t) = (logits[best], (1.0 / config.temperature) as f32);
    // An infinite best logit holds all the mass (+∞) or shares none (every logit −∞), and a
    // temperature below f32's range (1/T = ∞) is greedy.
    if max.is_infinite() || inv_t.is_infinite() {
        return Ok(best as u32);
    }
    // Unnormalised probabilities e^((l − max)/T), vectorised (one select, no branch); NaN and
    // −∞ logits weigh 0 (also when 1/T rounds to 0 for a huge T, which makes the rest uniform).
    let mut weights = vec![0f32; vocab];
    crate::ops::math::run_vectorised(#[inline(always)] || {
        for (w, &l) in weights.iter_mut().zip(&logits) {
            let e = crate::ops::math::exp((l - max) * inv_t);
            *w = if l > f32::NEG_INFINITY { e } else { 0.0 };
        }
    });
    // Sums per block of ids, in f64 lanes: the whole row's mass, and where a draw lands.
    let block_sums: Vec<f64> = weights.chunks(DRAW_BLOCK).map(lane_sum).collect();
    let total: f64 = block_sums.iter().sum();
    let top_k = config.top_k.filter(|&k| k > 0 && k < vocab);
    let top_p = config.top_p.filter(|&p| p < 1.0);
    if top_k.is_none() && top_p.is_none() {
        // The whole distribution: drawn in id order, without sorting (a server samples every
        // running request's row each step; sorting 50,257 candidates per row took 2.8 ms, and
        // with the f64 exp ~15% of `wick serve`'s CPU samples at 16 requests). The draw skips
        // whole blocks by their sums, then walks the one it lands in.
        return Ok(draw_in_blocks(&weights, &block_sums, total, rng.random()));
    }
    // Candidates by weight, most likely first (ties: lower id first), as one u64 key each (rank
    // of the logit, then id); only as many as top-k or top-p can keep are sorted.
    let mut keys: Vec<u64> = (0..vocab).filter(|&i| !logits[i].is_nan()).map(|i| (descending_rank(logits[i]) as u64) << 32 | i as u64).collect();
    let id = |key: u64| (key & 0xffff_ffff) as usize;
    let weight = |key: u64| weights[id(key)] as f64;
    let mut keep = top_k.unwrap_or(keys.len()).min(keys.len());
    if let (Some(p), None) = (top_p, top_k) {
        // The nucleus lies inside the best n once their mass reaches p: n grows ×4 from 256.
        let mut n = 256;
        while n < keep {
            keys.select_nth_unstable(n - 1);
            if keys[..n].iter().map(|&key| weight(key)).sum::<f64>() >= p * total {
                keep = n;
                break;
            }
            n *= 4;
        }
    }
    if keep < keys.len() {
        keys.select_nth_unstable(keep - 1);
        keys.truncate(keep);
    }
    keys.sort_unstable();
    // Top-k renormalises over the k kept; top-p then keeps the shortest run whose share of that
    // mass reaches p.
    let mut kept_total: f64 = if top_k.is_some() { keys.iter().map(|&key| weight(key)).sum() } else { total };
    if let Some(p) = top_p {
        let mut cum = 0.0;
        let mut n = 0;
        for &key in &keys {
            n += 1;
            cum += weight(key);
            if cum >= p * kept_total {
                break;
            }
        }
        keys.truncate(n.max(1));
        kept_total = keys.iter().map(|&key| weight(key)).sum();
    }
    Ok(draw(keys.iter().map(|&key| (id(key), weight(key))), kept_total, rng.random()))
}

/// Ids per block of [`draw_in_blocks`]'s sums.
const DRAW_BLOCK: usize = 512;

/// Σ `w` in f64, over 8 lanes (vectorised; a single running sum is a chain of dependent adds).
fn lane_sum(w: &[f32]) -> f64 {
    crate::ops::math::run_vectorised(#[inline(always)] || {
        let mut lanes = [0f64; 8];
        let chunks = w.chunks_exact(8);
        let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        for c in chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += v as f64;
            }
        }
        lanes.iter().sum::<f64>() + rest
    })
}

/// [`draw`] over `weights` in id order, `block_sums` the [`lane_sum`]s of its blocks of
/// [`DRAW_BLOCK`] and `total` theirs: whole blocks are skipped by their sums, then the block the
/// draw lands in is walked one id at a time (from the sum of the blocks before it).
fn draw_in_blocks(weights: &[f32], block_sums: &[f64], total: f64, u: f64) -> u32 {
    let target = u * total;
    // The block it lands in, with the sum of the blocks before it, or, when rounding left u
    // uncovered, the last block with any weight; within it the walk's own rounding can fall short
    // of the block's sum: then its last id with any weight.
    let (mut cum, mut landing) = (0.0, None);
    for (b, &s) in block_sums.iter().enumerate() {
        if s > 0.0 {
            landing = Some((b, cum));
            if target < cum + s {
                break;
            }
        }
        cum += s;
    }
    let Some((b, cum_before)) = landing else { return 0 };
    let ids = b * DRAW_BLOCK..((b + 1) * DRAW_BLOCK).min(weights.len());
    let block = ids.map(|i| (i, weights[i] as f64));
    draw_from(block, cum_before, target)
}

/// The candidate whose share of the cumulative weight (in the order given) covers `u` ∈ [0, 1)
/// of `total`; the last one with any weight when rounding leaves `u` uncovered.
fn draw(candidates: impl Iterator<Item = (usize, f64)>, total: f64, u: f64) -> u32 {
    draw_from(candidates, 0.0, u * total)
}

/// The first candidate at which `start` plus the cumulative weight passes `target`, else the
/// last with any weight (0 if none has).
fn draw_from(candidates: impl Iterator<Item = (usize, f64)>, start: f64, target: f64) -> u32 {
    let (mut cum, mut last) = (start, 0);
    for (i, w) in candidates {
        if w > 0.0 {
            cum += w;
            last = i;
            if target < cum {
                return i as u32;
            }
        }
    }
    last as u32
}

/// A u32 that orders non-NaN floats from the largest to the smallest (-0 and +0 equal).
fn descending_rank(x: f32) -> u32 {
    let bits = (x + 0.0).to_bits();
    let ascending = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
    !ascending
}

fn argmax(v: &[f32]) -> Option<u32> {
    // The largest value over 8 lanes (vectorised; `max` skips NaN), then its first position.
    let max = crate::ops::math::run_vectorised(#[inline(always)] || {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let chunks = v.chunks_exact(8);
        let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l = l.max(x);
            }
        }
        lanes.iter().fold(rest, |a, &b| a.max(b))
    });
    v.iter().position(|&x| x == max).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token = one byte; decoding is lossy UTF-8 (as byte-level BPE's), and the decoder counts
    /// the tokens it is given.
    struct Bytes(std::cell::Cell<usize>);

    impl Detokenize for Bytes {
        fn detokenize(&self, ids: &[u32]) -> Result<String> {
            self.0.set(self.0.get().max(ids.len()));
            Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned())
        }
    }

    fn stream(decoder: &Bytes, ids: &[u32]) -> Result<Vec<String>> {
        let mut s = TextStream::new();
        let mut pieces = vec![];
        for &id in ids {
            pieces.extend(s.push(decoder, id)?);
        }
        pieces.extend(s.finish(decoder)?);
        assert_eq!(s.text(), pieces.concat());
        Ok(pieces)
    }

    #[test]
    fn text_stream_holds_back_split_characters_and_decodes_a_short_window() -> Result<()> {
        let decoder = Bytes(Default::default());
        // "abé" with é's two bytes in two tokens, then an incomplete character at the end.
        let pieces = stream(&decoder, &[b'a' as u32, b'b' as u32, 0xC3, 0xA9, 0xE2, 0x82])?;
        assert_eq!(pieces, ["a", "b", "é", "\u{FFFD}"]);
        // A long text of 1-, 2-, 3- and 4-byte characters split into byte tokens: the pieces add up
        // to the full decoding, no piece but the last ends in U+FFFD, and no decoding sees more
        // than a few tokens.
        let text = "naïve café — 漢字 🦀 ".repeat(50);
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let decoder = Bytes(Default::default());
        let pieces = stream(&decoder, &ids)?;
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.ends_with('\u{FFFD}')));
        assert!(decoder.0.get() <= 8, "a decoding saw {} tokens", decoder.0.get());
        Ok(())
    }

    #[test]
    fn stop_strings_are_found_across_tokens_and_in_held_text() -> Result<()> {
        let decoder = Bytes(Default::default());
        let mut s = TextStream::new();
        let stops = vec!["cd".to_string(), "é".to_string()];
        let mut hits = vec![];
        for &id in b"abcd" {
            let before = s.text().len();
            s.push(&decoder, id as u32)?;
            hits.push(contains_stop_string(&s, before, &stops));
        }
        assert_eq!(hits, [false, false, false, true]);
        // A stop string inside text still held back (the next character is incomplete).
        let mut s = TextStream::new();
        for id in [b'x' as u32, 0xC3, 0xA9] {
            s.push(&decoder, id)?;
        }
        let before = s.text().len();
        s.push(&decoder, 0xE2)?;
        assert!(s.held().ends_with('\u{FFFD}') && contains_stop_string(&s, before, &["é\u{FFFD}".to_string()]));
        assert!(!contains_stop_string(&s, before, &[]));
        Ok(())
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

    /// A generator whose every f64 draw is `u` (rand's f64 is the top 53 bits of a u64 · 2⁻⁵³).
    struct Fixed(u64);
    impl rand::RngCore for Fixed {
        fn next_u32(&mut self) -> u32 {
            (self.0 >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            dest.iter_mut().for_each(|b| *b = self.0 as u8);
        }
    }
    fn drawing(u: f64) -> Fixed {
        Fixed(((u * (1u64 << 53) as f64) as u64) << 11)
    }

    /// The sampler spelled out: f64 probabilities, every candidate sorted for top-k / top-p (the
    /// whole distribution in id order), the first candidate whose cumulative share passes u;
    /// also how far u is from the nearest boundary between two candidates.
    fn reference_choice(logits: &[f32], cfg: &GenerationConfig, u: f64) -> (u32, f64) {
        let t = cfg.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |i: usize| ((logits[i] as f64 - max) / t).exp();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let (top_k, top_p) = (cfg.top_k.filter(|&k| k > 0 && k < logits.len()), cfg.top_p.filter(|&p| p < 1.0));
        if top_k.is_some() || top_p.is_some() {
            order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
            order.truncate(top_k.unwrap_or(logits.len()));
            if let Some(p) = top_p {
                let total: f64 = order.iter().map(|&i| weight(i)).sum();
                let (mut cum, mut n) = (0.0, 0);
                for &i in &order {
                    n += 1;
                    cum += weight(i) / total;
                    if cum >= p {
                        break;
                    }
                }
                order.truncate(n);
            }
        }
        let total: f64 = order.iter().map(|&i| weight(i)).sum();
        let (mut cum, mut margin, mut pick) = (0.0, f64::INFINITY, None);
        for &i in &order {
            cum += weight(i) / total;
            margin = margin.min((cum - u).abs());
            if pick.is_none() && u < cum {
                pick = Some(i as u32);
            }
        }
        (pick.unwrap_or(*order.last().unwrap() as u32), margin)
    }

    /// Every path of the sampler (the whole distribution unsorted; top-k; top-p, whose nucleus
    /// is found among the best 256, 1,024, ... candidates before sorting; both) picks what the
    /// spelled-out sampler picks for the same draw, on peaked and flat distributions over 3,000
    /// tokens, wherever the draw is not within rounding of a boundary.
    #[test]
    fn sampling_matches_the_spelled_out_sampler() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let configs = [
            GenerationConfig { temperature: 1.0, ..Default::default() },
            GenerationConfig { temperature: 0.6, ..Default::default() },
            GenerationConfig { temperature: 1.0, top_k: Some(40), ..Default::default() },
            GenerationConfig { temperature: 1.0, top_p: Some(0.5), ..Default::default() },
            GenerationConfig { temperature: 0.8, top_p: Some(0.95), ..Default::default() },
            GenerationConfig { temperature: 1.0, top_p: Some(0.999), ..Default::default() },
            GenerationConfig { temperature: 1.3, top_k: Some(300), top_p: Some(0.9), ..Default::default() },
        ];
        let (mut compared, mut skipped) = (0, 0);
        for spread in [0.3f32, 3.0, 8.0] {
            let logits: Vec<f32> = (0..3000).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * spread).collect();
            for cfg in &configs {
                for j in 0..100 {
                    let u = (j as f64 + 0.5) / 100.0;
                    let (want, margin) = reference_choice(&logits, cfg, u);
                    if margin < 1e-5 {
                        skipped += 1;
                        continue;
                    }
                    let got = choose(logits.clone(), &[], cfg, &mut drawing(u)).unwrap();
                    assert_eq!(got, want, "spread {spread}, {cfg:?}, u {u}");
                    compared += 1;
                }
            }
        }
        assert!(skipped * 50 < compared, "{skipped} draws too close to a boundary, {compared} compared");
    }

    /// The draw over blocks of ids: candidates in the first, a later and the last (partial)
    /// block, whole blocks without any weight between them, and draws at both ends of [0, 1).
    #[test]
    fn draws_across_blocks() {
        let mut logits = vec![f32::NEG_INFINITY; 2 * DRAW_BLOCK + 300];
        for id in [3, DRAW_BLOCK + 200, 2 * DRAW_BLOCK + 299] {
            logits[id] = 0.0;
        }
        logits[7] = f32::NAN;
        let cfg = GenerationConfig { temperature: 1.0, ..Default::default() };
        let draw = |u: f64| choose(logits.clone(), &[], &cfg, &mut drawing(u)).unwrap() as usize;
        assert_eq!(draw(0.0), 3);
        assert_eq!(draw(0.3), 3);
        assert_eq!(draw(0.5), DRAW_BLOCK + 200);
        assert_eq!(draw(0.9), 2 * DRAW_BLOCK + 299);
        assert_eq!(draw(1.0 - f64::EPSILON / 2.0), 2 * DRAW_BLOCK + 299);
        // the middle block empty too: two candidates, a block without weight between them
        logits[DRAW_BLOCK + 200] = f32::NEG_INFINITY;
        let draw = |u: f64| choose(logits.clone(), &[], &cfg, &mut drawing(u)).unwrap() as usize;
        assert_eq!(draw(0.49), 3);
        assert_eq!(draw(0.51), 2 * DRAW_BLOCK + 299);
    }

    /// Logits the sampler must survive: NaN and infinite ones, and temperatures at the ends of
    /// f32's range.
    #[test]
    fn sampling_edge_cases() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let t = |temperature: f64| GenerationConfig { temperature, ..Default::default() };
        let inf = f32::INFINITY;
        for _ in 0..20 {
            // the one +∞ logit, whatever the temperature
            assert_eq!(choose(vec![0.5, inf, f32::NAN, 2.0], &[], &t(1.0), &mut rng).unwrap(), 1);
            // every logit −∞ but a NaN: the first −∞ one (never the NaN)
            assert_eq!(choose(vec![f32::NAN, -inf, -inf], &[], &t(1.0), &mut rng).unwrap(), 1);
            // a temperature so small that 1/T overflows f32: greedy
            assert_eq!(choose(vec![0.1, 3.0, 0.2], &[], &t(1e-40), &mut rng).unwrap(), 1);
            // a temperature so large that 1/T rounds to 0: never a −∞ or NaN logit
            let pick = choose(vec![-inf, 0.1, f32::NAN, 3.0, -inf], &[], &t(1e50), &mut rng).unwrap();
            assert!(pick == 1 || pick == 3, "{pick}");
            // −∞ logits are never drawn at an ordinary temperature either
            let pick = choose(vec![-inf, 0.0, -inf, 0.0], &[], &t(1.0), &mut rng).unwrap();
            assert!(pick == 1 || pick == 3, "{pick}");
        }
        assert!(choose(vec![f32::NAN; 3], &[], &t(1.0), &mut rng).is_err());
    }

    /// Not a test: time of one sampling over GPT-2's vocabulary (`cargo test --release --lib
    /// sampling_time -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn sampling_time() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let logits: Vec<f32> = (0..50257).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * 2.0).collect();
        for cfg in [GenerationConfig { temperature: 1.0, ..Default::default() }, GenerationConfig { temperature: 1.0, top_p: Some(0.9), ..Default::default() }] {
            let start = std::time::Instant::now();
            for _ in 0..200 {
                std::hint::black_box(choose(logits.clone(), &[], &cfg, &mut rng).unwrap());
            }
            eprintln!("{cfg:?}: {:.3} ms a row", start.elapsed().as_secs_f64() * 1e3 / 200.0);
        }
    }

    /// The vectorised argmax against the plain loop (first of the largest, NaN skipped, None
    /// when every value is NaN): ties, ±0, ±∞, NaN anywhere, lengths around the lane count.
    #[test]
    fn argmax_is_the_first_largest() {
        let plain = |v: &[f32]| {
            let mut best: Option<(usize, f32)> = None;
            for (i, &x) in v.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|(_, b)| x > b) {
                    best = Some((i, x));
                }
            }
            best.map(|(i, _)| i as u32)
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0];
        for len in [0, 1, 7, 8, 9, 17, 100] {
            for _ in 0..200 {
                let v: Vec<f32> = (0..len).map(|_| if rng.random::<f32>() < 0.3 { specials[rng.random_range(0..specials.len())] } else { rng.random_range(-3i32..3) as f32 }).collect();
                assert_eq!(argmax(&v), plain(&v), "{v:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 9]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY]), Some(0));
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

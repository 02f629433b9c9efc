//! Dropout on the attention probabilities without materialising them: every (batch·head, query,
//! key) decides keep or drop by a counter-based hash of (seed, position), so the forward pass and
//! the backward pass draw the same mask independently, tile by tile (FlashAttention's approach;
//! there it is Philox, here splitmix64's finaliser, which is ample for masks).
//!
//! The probabilities P are the softmax's, normalised before the mask is applied (the row sum l
//! of the online softmax counts every key); kept entries are scaled by 1/(1−p), as in
//! `torch.nn.functional.dropout`. [`keep_mask`] builds the same mask as a tensor, for the
//! reference path and the tests.

use candle_core::{Device, Result, Tensor};

/// The mask of one call: drop when the hash's high 32 bits fall below `threshold` = p·2³².
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AttentionDropout {
    pub seed: u64,
    pub threshold: u64,
    /// 1/(1−p), the multiplier of kept entries.
    pub scale: f32,
}

impl AttentionDropout {
    /// Dropout with probability `p` (in (0, 1)) and a seed drawn from wick's dropout generator
    /// (so `wick::nn::reseed` makes it reproducible, step by step).
    pub fn new(p: f64) -> Result<Self> {
        if !(p > 0.0 && p < 1.0) {
            candle_core::bail!("attention dropout must be in (0, 1), got {p}")
        }
        Ok(Self::with_seed(p, crate::nn::draw_dropout_seed()))
    }

    pub fn with_seed(p: f64, seed: u64) -> Self {
        Self { seed, threshold: (p * 4_294_967_296.0) as u64, scale: (1.0 / (1.0 - p)) as f32 }
    }

    /// The multiplier (0 or 1/(1−p)) of one probability: `row_id` = (batch·heads index)·q_len +
    /// query row, `lk` = kv_len, `key` the key's index.
    #[inline(always)]
    pub fn multiplier(&self, row_id: usize, lk: usize, key: usize) -> f32 {
        let counter = (row_id as u64).wrapping_mul(lk as u64).wrapping_add(key as u64);
        if (mix(self.seed ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 32) >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// Multiplies `row` (keys `key0..key0 + row.len()` of row `row_id`) by its mask.
    #[inline(always)]
    pub fn apply(&self, row: &mut [f32], row_id: usize, lk: usize, key0: usize) {
        for (j, x) in row.iter_mut().enumerate() {
            *x *= self.multiplier(row_id, lk, key0 + j);
        }
    }
}

/// splitmix64's output function: a bijection of u64 with full avalanche.
#[inline(always)]
fn mix(x: u64) -> u64 {
    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The mask as an f32 tensor (batch, heads, q_len, kv_len) of 0 and 1/(1−p) on `device`.
pub(crate) fn keep_mask(d: &AttentionDropout, b: usize, h: usize, lq: usize, lk: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..b * h * lq).flat_map(|row| (0..lk).map(move |j| d.multiplier(row, lk, j))).collect();
    Tensor::from_vec(v, (b, h, lq, lk), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_requested_fraction_and_depends_on_the_seed() {
        let d = AttentionDropout::with_seed(0.1, 7);
        let n = 200_000;
        let dropped = (0..n).filter(|&i| d.multiplier(i / 128, 128, i % 128) == 0.0).count();
        let frac = dropped as f64 / n as f64;
        assert!((frac - 0.1).abs() < 0.005, "dropped {frac}");
        let other = AttentionDropout::with_seed(0.1, 8);
        let same = (0..1000).filter(|&i| d.multiplier(0, 1000, i) == other.multiplier(0, 1000, i)).count();
        assert!(same < 900, "seeds 7 and 8 agree on {same} of 1000");
        assert!((d.multiplier(3, 5, 1) - d.multiplier(3, 5, 1)).abs() == 0.0);
    }
}

//! Token streams cut into fixed-length windows for language modelling: a character-level corpus
//! here, and any tokenizer's ids through [`TokenWindows`].

use super::Dataset;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Arc;

/// A text file as a sequence of character ids over its own sorted character set.
pub struct CharCorpus {
    pub vocab: Vec<char>,
    pub ids: Vec<u32>,
}

impl CharCorpus {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if text.is_empty() {
            bail!("{}: the corpus is empty", path.display());
        }
        Ok(Self::from_text(&text))
    }

    pub fn from_text(text: &str) -> Self {
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let ids = text.chars().map(|c| vocab.binary_search(&c).unwrap() as u32).collect();
        Self { vocab, ids }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| match self.vocab.binary_search(&c) {
                Ok(i) => Ok(i as u32),
                Err(_) => bail!("character {c:?} is not in the corpus vocabulary"),
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.vocab.get(i as usize).copied().unwrap_or('\u{FFFD}')).collect()
    }

    /// Splits the ids into a training part and a validation part (the last `val_fraction`).
    pub fn split(&self, val_fraction: f64) -> (Vec<u32>, Vec<u32>) {
        let n_val = ((self.ids.len() as f64) * val_fraction).round() as usize;
        let cut = self.ids.len() - n_val.min(self.ids.len());
        (self.ids[..cut].to_vec(), self.ids[cut..].to_vec())
    }
}

/// Non-overlapping windows of `seq_len + 1` tokens: item `i` is the input
/// `tokens[i*seq_len .. i*seq_len+seq_len]` and the target shifted by one.
pub struct TokenWindows {
    tokens: Arc<Vec<u32>>,
    seq_len: usize,
}

impl TokenWindows {
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Result<Self> {
        if seq_len == 0 {
            bail!("sequence length must be at least 1");
        }
        if tokens.len() < seq_len + 1 {
            bail!("{} tokens are too few for one window of {} (+1 target)", tokens.len(), seq_len);
        }
        Ok(Self { tokens: Arc::new(tokens), seq_len })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
}

impl Dataset for TokenWindows {
    /// (inputs, targets), both (batch, seq_len) u32.
    type Batch = (Tensor, Tensor);

    fn len(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(indices.len() * t);
        let mut targets = Vec::with_capacity(indices.len() * t);
        for &i in indices {
            let start = i * t;
            inputs.extend_from_slice(&self.tokens[start..start + t]);
            targets.extend_from_slice(&self.tokens[start + 1..start + t + 1]);
        }
        let shape = (indices.len(), t);
        Ok((Tensor::from_vec(inputs, shape, device)?, Tensor::from_vec(targets, shape, device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_round_trips_and_windows_shift_by_one() -> Result<()> {
        let c = CharCorpus::from_text("hello world");
        assert_eq!(c.vocab.len(), 8);
        assert_eq!(c.decode(&c.encode("low")?), "low");
        assert!(c.encode("z").is_err());
        let w = TokenWindows::new(c.ids.clone(), 3)?;
        assert_eq!(w.len(), 3);
        let (x, y) = w.batch(&[1], &Device::Cpu)?;
        assert_eq!(c.decode(&x.flatten_all()?.to_vec1()?), "lo ");
        assert_eq!(c.decode(&y.flatten_all()?.to_vec1()?), "o w");
        let (tr, va) = c.split(0.1);
        assert_eq!((tr.len(), va.len()), (10, 1));
        assert!(TokenWindows::new(vec![1, 2], 2).is_err());
        Ok(())
    }

    #[test]
    fn empty_corpus_is_an_error() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = d.path().join("empty.txt");
        std::fs::write(&p, "")?;
        assert!(CharCorpus::from_file(&p).err().unwrap().to_string().contains("empty"));
        Ok(())
    }
}

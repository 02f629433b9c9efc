//! Keeping a subset of a model's layers: layer `keep[j]` of the source becomes layer `j`, the
//! others are dropped, and the config counts `keep.len()` layers. DistilBERT starts its student
//! this way (every other layer of the teacher); structured pruning's `--drop-layers` is the
//! complement. Embeddings, the pooler and the task head are kept as they are.

use super::{Checkpoint, Compressible};
use anyhow::{bail, Result};
use std::collections::{BTreeSet, HashMap};

/// `count` layer indices spread evenly over `total` layers, starting at the first: every other
/// layer when `count` is half of `total` (DistilBERT's choice: 0, 2, 4 of 6).
pub fn spread_evenly(total: usize, count: usize) -> Result<Vec<usize>> {
    if count == 0 {
        bail!("a student needs at least one layer");
    }
    if count > total {
        bail!("{count} layers asked for, but the teacher has only {total}");
    }
    Ok((0..count).map(|j| j * total / count).collect())
}

/// The layers left after dropping `drop` (indices into `total` layers); an index out of range,
/// or dropping every layer, is an error.
pub fn complement(total: usize, drop: &[usize]) -> Result<Vec<usize>> {
    if let Some(bad) = drop.iter().find(|&&i| i >= total) {
        bail!("layer {bad} does not exist: the model has {total} layers (0 to {})", total.saturating_sub(1));
    }
    let dropped: BTreeSet<usize> = drop.iter().copied().collect();
    let kept: Vec<usize> = (0..total).filter(|i| !dropped.contains(i)).collect();
    if kept.is_empty() {
        bail!("dropping all {total} layers leaves no model");
    }
    Ok(kept)
}

/// `source` with only the layers `keep` (strictly increasing indices), renumbered from 0.
pub fn keep_layers<M: Compressible>(source: &Checkpoint<M>, keep: &[usize]) -> Result<Checkpoint<M>> {
    let total = M::num_layers(&source.config);
    if keep.is_empty() {
        bail!("no layers to keep");
    }
    if let Some(bad) = keep.iter().find(|&&i| i >= total) {
        bail!("layer {bad} does not exist: the model has {total} layers");
    }
    if keep.windows(2).any(|w| w[0] >= w[1]) {
        bail!("layers to keep must be distinct and in increasing order, got {keep:?}");
    }
    let new_index: HashMap<usize, usize> = keep.iter().enumerate().map(|(j, &i)| (i, j)).collect();
    let mut tensors = HashMap::new();
    for (name, t) in &source.tensors {
        match layer_of::<M>(name) {
            Some((layer, rest)) => {
                if let Some(j) = new_index.get(&layer) {
                    tensors.insert(format!("{}{j}.{rest}", M::LAYER_PREFIX), t.clone());
                }
            }
            None => {
                tensors.insert(name.clone(), t.clone());
            }
        }
    }
    let mut config = source.config.clone();
    M::set_num_layers(&mut config, keep.len());
    Ok(Checkpoint { config, tensors })
}

/// The layer index of a tensor inside a layer and its name within the layer
/// (`bert.encoder.layer.3.output.dense.weight` → (3, `output.dense.weight`)).
pub fn layer_of<M: Compressible>(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix(M::LAYER_PREFIX)?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn student_layers_are_spread_evenly_and_checked() {
        assert_eq!(spread_evenly(6, 3).unwrap(), [0, 2, 4]);
        assert_eq!(spread_evenly(12, 6).unwrap(), [0, 2, 4, 6, 8, 10]);
        assert_eq!(spread_evenly(6, 6).unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(spread_evenly(6, 1).unwrap(), [0]);
        assert!(spread_evenly(6, 7).unwrap_err().to_string().contains("only 6"));
        assert!(spread_evenly(6, 0).is_err());
        assert_eq!(complement(4, &[1, 3]).unwrap(), [0, 2]);
        assert!(complement(4, &[4]).unwrap_err().to_string().contains("layer 4 does not exist"));
        assert!(complement(2, &[0, 1]).is_err());
    }
}

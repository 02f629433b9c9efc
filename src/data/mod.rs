//! Datasets, seeded batching and the readers for the formats wick's examples use.

pub mod chars;
pub mod mnist;
pub mod text;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{seq::SliceRandom, SeedableRng};

/// Something the trainer can draw batches from: items are addressed by index, and a batch is
/// built (collated onto `device`) from a list of indices.
pub trait Dataset {
    type Batch;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Result<Self::Batch>;
}

/// How an epoch is cut into batches. The order of epoch `e` depends only on `(seed, e)`,
/// which is what lets a resumed run see exactly the batches the uninterrupted run would have.
#[derive(Clone, Debug)]
pub struct Batching {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
}

impl Batching {
    pub fn new(batch_size: usize) -> Self {
        Self { batch_size, shuffle: true, drop_last: false, seed: 0 }
    }

    pub fn sequential(batch_size: usize) -> Self {
        Self { shuffle: false, ..Self::new(batch_size) }
    }

    pub fn batches_per_epoch(&self, len: usize) -> usize {
        if self.drop_last {
            len / self.batch_size
        } else {
            len.div_ceil(self.batch_size)
        }
    }

    /// The index lists of every batch of `epoch`, over a dataset of `len` items.
    pub fn epoch(&self, len: usize, epoch: usize) -> Result<Vec<Vec<usize>>> {
        if self.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        if len == 0 {
            bail!("the dataset is empty: nothing to batch");
        }
        if self.drop_last && len < self.batch_size {
            bail!("the dataset has {len} items, fewer than one batch of {} (drop_last is on)", self.batch_size);
        }
        let mut order: Vec<usize> = (0..len).collect();
        if self.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64));
            order.shuffle(&mut rng);
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        if self.drop_last && batches.last().is_some_and(|b| b.len() < self.batch_size) {
            batches.pop();
        }
        Ok(batches)
    }
}

/// Rows of an in-memory table (images, feature vectors) with integer or float targets.
/// Kept on the CPU; each batch is gathered there and moved to the device.
pub struct TensorDataset {
    pub inputs: Tensor,
    pub targets: Tensor,
}

impl TensorDataset {
    pub fn new(inputs: Tensor, targets: Tensor) -> Result<Self> {
        let (n, m) = (inputs.dim(0)?, targets.dim(0)?);
        if n != m {
            bail!("{n} inputs but {m} targets");
        }
        Ok(Self { inputs, targets })
    }

    /// The first `n` rows (all of them when `n` is larger).
    pub fn take(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len());
        Self::new(self.inputs.narrow(0, 0, n)?, self.targets.narrow(0, 0, n)?)
    }
}

impl Dataset for TensorDataset {
    type Batch = (Tensor, Tensor);
    fn len(&self) -> usize {
        self.inputs.dim(0).unwrap_or(0)
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), self.inputs.device())?;
        Ok((
            self.inputs.index_select(&idx, 0)?.to_device(device)?,
            self.targets.index_select(&idx, 0)?.to_device(device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_seeded_permutations() -> Result<()> {
        let b = Batching { batch_size: 4, shuffle: true, drop_last: false, seed: 3 };
        let e0 = b.epoch(10, 0)?;
        assert_eq!(e0.len(), 3);
        assert_eq!(e0[2].len(), 2);
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(e0, b.epoch(10, 0)?);
        assert_ne!(e0, b.epoch(10, 1)?);
        let dl = Batching { drop_last: true, ..b.clone() };
        assert_eq!(dl.epoch(10, 0)?.len(), 2);
        assert_eq!(dl.batches_per_epoch(10), 2);
        assert_eq!(Batching::sequential(4).epoch(5, 9)?, vec![vec![0, 1, 2, 3], vec![4]]);
        Ok(())
    }

    #[test]
    fn empty_or_bad_batching_is_an_error() {
        assert!(Batching::new(4).epoch(0, 0).unwrap_err().to_string().contains("empty"));
        assert!(Batching::new(0).epoch(3, 0).is_err());
        let b = Batching { drop_last: true, ..Batching::new(8) };
        assert!(b.epoch(3, 0).unwrap_err().to_string().contains("fewer than one batch"));
    }

    #[test]
    fn tensor_dataset_gathers_rows() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12., &dev)?.reshape((6, 2))?;
        let y = Tensor::arange(0u32, 6, &dev)?;
        let ds = TensorDataset::new(x, y)?;
        let (bx, by) = ds.batch(&[4, 1], &dev)?;
        assert_eq!(bx.to_vec2::<f32>()?, vec![vec![8., 9.], vec![2., 3.]]);
        assert_eq!(by.to_vec1::<u32>()?, vec![4, 1]);
        assert!(TensorDataset::new(Tensor::zeros((3, 2), candle_core::DType::F32, &dev)?, Tensor::zeros(2, candle_core::DType::U32, &dev)?).is_err());
        Ok(())
    }
}

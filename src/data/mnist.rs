//! MNIST in the IDX format (LeCun's files), gzipped or not.

use super::TensorDataset;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The normalisation every MNIST recipe uses: the training set's mean and std of pixel/255.
pub const MEAN: f32 = 0.1307;
pub const STD: f32 = 0.3081;

pub struct Mnist {
    /// (N, 1, 28, 28) f32, normalised with [`MEAN`] and [`STD`].
    pub train: TensorDataset,
    pub test: TensorDataset,
}

/// Reads `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
/// `t10k-labels-idx1-ubyte` from `dir`, each optionally with a `.gz` suffix.
pub fn load_dir(dir: &Path) -> Result<Mnist> {
    if !dir.is_dir() {
        bail!("MNIST folder {} does not exist", dir.display());
    }
    let split = |prefix: &str| -> Result<TensorDataset> {
        let images = read_images(&find(dir, &format!("{prefix}-images-idx3-ubyte"))?)?;
        let labels = read_labels(&find(dir, &format!("{prefix}-labels-idx1-ubyte"))?)?;
        TensorDataset::new(images, labels).with_context(|| format!("MNIST {prefix} split in {}", dir.display()))
    };
    Ok(Mnist { train: split("train")?, test: split("t10k")? })
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    let alt = stem.replacen("-idx", ".idx", 1);
    for name in [stem.to_string(), format!("{stem}.gz"), alt.clone(), format!("{alt}.gz")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{} has no {stem} or {stem}.gz", dir.display())
}

/// The whole file, decompressed when it starts with the gzip magic bytes.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks the IDX header (magic, dimensions) and returns the dimensions and the payload.
fn parse_idx<'a>(path: &Path, bytes: &'a [u8], rank: usize) -> Result<(Vec<usize>, &'a [u8])> {
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        bail!("{}: too short for an IDX file ({} bytes)", path.display(), bytes.len());
    }
    let magic = u32::from_be_bytes(bytes[0..4].try_into()?);
    let expected = 0x0800 | rank as u32;
    if magic != expected {
        bail!("{}: bad IDX magic {magic:#010x}, expected {expected:#010x} (unsigned bytes, rank {rank})", path.display());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    // Checked: four u32 dimensions can multiply past usize, which would wrap and pass the check.
    let Some(n) = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) else {
        bail!("{}: header dimensions {dims:?} are impossibly large (corrupt header)", path.display());
    };
    let payload = &bytes[header..];
    if payload.len() != n {
        bail!("{}: header says {dims:?} ({n} bytes) but the file holds {} bytes", path.display(), payload.len());
    }
    if n == 0 {
        bail!("{}: the file holds no items", path.display());
    }
    Ok((dims, payload))
}

pub fn read_images(path: &Path) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let (dims, pixels) = parse_idx(path, &bytes, 3)?;
    let data: Vec<f32> = pixels.iter().map(|&p| (p as f32 / 255.0 - MEAN) / STD).collect();
    Ok(Tensor::from_vec(data, (dims[0], 1, dims[1], dims[2]), &Device::Cpu)?)
}

pub fn read_labels(path: &Path) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let (dims, labels) = parse_idx(path, &bytes, 1)?;
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        bail!("{}: label {bad} is not a digit", path.display());
    }
    Ok(Tensor::from_vec(labels.iter().map(|&l| l as u32).collect::<Vec<_>>(), dims[0], &Device::Cpu)?)
}

/// Writes an IDX file (for tests and for users who make their own digit sets).
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let mut out = (0x0800u32 | dims.len() as u32).to_be_bytes().to_vec();
    for d in dims {
        out.extend((*d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_plain_and_gzipped_idx() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let pixels: Vec<u8> = (0..2 * 28 * 28).map(|i| (i % 256) as u8).collect();
        for prefix in ["train", "t10k"] {
            write_idx(&dir.path().join(format!("{prefix}-images-idx3-ubyte")), &[2, 28, 28], &pixels)?;
        }
        // labels gzipped for one split, plain for the other
        let mut labels = Vec::new();
        write_idx(&dir.path().join("tmp"), &[2], &[3, 7])?;
        let mut gz = flate2::write::GzEncoder::new(&mut labels, flate2::Compression::fast());
        gz.write_all(&std::fs::read(dir.path().join("tmp"))?)?;
        gz.finish()?;
        std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), &labels)?;
        std::fs::rename(dir.path().join("tmp"), dir.path().join("t10k-labels-idx1-ubyte"))?;
        let m = load_dir(dir.path())?;
        assert_eq!(m.train.inputs.dims(), &[2, 1, 28, 28]);
        assert_eq!(m.train.targets.to_vec1::<u32>()?, vec![3, 7]);
        assert_eq!(m.test.targets.to_vec1::<u32>()?, vec![3, 7]);
        let first = m.train.inputs.flatten_all()?.get(1)?.to_scalar::<f32>()?;
        assert!((first - (1.0 / 255.0 - MEAN) / STD).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn bad_files_are_named_errors() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let err = load_dir(dir.path()).err().unwrap().to_string();
        assert!(err.contains("train-images-idx3-ubyte"), "{err}");
        let p = dir.path().join("x");
        write_idx(&p, &[5, 28, 28], &[0; 100])?;
        let err = read_images(&p).unwrap_err().to_string();
        assert!(err.contains("header says") && err.contains("x"), "{err}");
        std::fs::write(&p, [0x1f, 0x8b, 1, 2, 3])?;
        assert!(read_images(&p).unwrap_err().to_string().contains("corrupt gzip"));
        write_idx(&p, &[2], &[1, 12])?;
        assert!(read_labels(&p).unwrap_err().to_string().contains("not a digit"));
        // A header whose dimensions multiply past 2^64 (they would wrap to a small size).
        write_idx(&p, &[u32::MAX as usize, u32::MAX as usize, u32::MAX as usize], &[0; 16])?;
        assert!(read_images(&p).unwrap_err().to_string().contains("impossibly large"));
        Ok(())
    }
}

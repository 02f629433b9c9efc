//! What the trainer keeps in step across ranks: the gradients of each optimizer step (summed in
//! buckets), the weights at the start (rank 0's), evaluation outputs (gathered) and decisions
//! one rank's clock would take alone (rank 0's). With one process every function here returns
//! its input without copying.

use super::Collective;
use crate::train::metrics::EvalBatch;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

/// Elements (f32) per bucket of gradients: 25 MB, the default of PyTorch DDP's `bucket_cap_mb`.
/// Few large messages keep the per-call latency of the collective out of the step time; a
/// parameter larger than a bucket is a bucket alone.
pub const BUCKET_ELEMENTS: usize = 25 * 1024 * 1024 / 4;

/// Consecutive ranges of `sizes` whose sums reach `cap` (the last one may be smaller).
pub fn buckets(sizes: &[usize], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        filled += n;
        if filled >= cap {
            out.push(start..i + 1);
            (start, filled) = (i + 1, 0);
        }
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Sums, across ranks, this rank's gradients of `vars` (each already weighted by this rank's
/// share of the step's items, so that the sum is the gradient of the whole global batch) and
/// `loss` (weighted the same way). A gradient is `None` afterwards only where it was `None` on
/// every rank (a parameter no rank's loss reached). With `WICK_DIST_TIMING` set on rank 0, every
/// rank first waits for the others (a barrier) and rank 0 prints each call's bytes and seconds.
pub fn all_reduce_grads(world: &dyn Collective, vars: &[&Var], grads: Vec<Option<Tensor>>, loss: f64) -> Result<(f64, Vec<Option<Tensor>>)> {
    if world.world_size() == 1 {
        return Ok((loss, grads));
    }
    if vars.len() != grads.len() {
        bail!("{} gradients for {} parameters", grads.len(), vars.len());
    }
    // Timing: first wait for the slowest rank, so that the all-reduce's time is its own. Rank
    // 0's environment decides, once, for all (a barrier on one rank alone would never return).
    static TIMING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let timing = match TIMING.get() {
        Some(&timing) => timing,
        None => *TIMING.get_or_init(|| rank0_says(world, std::env::var_os("WICK_DIST_TIMING").is_some()).unwrap_or(false)),
    };
    let waited = match timing {
        true => {
            let t = std::time::Instant::now();
            world.barrier()?;
            t.elapsed()
        }
        false => std::time::Duration::ZERO,
    };
    let started = std::time::Instant::now();
    let mut in_collective = std::time::Duration::ZERO;
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let mut out: Vec<Option<Tensor>> = vec![None; vars.len()];
    // Whether each rank had each gradient, and the loss, travel in one more small bucket; the
    // loss as two f32 (its f32 rounding and the rest), which keep ~14 of an f64's digits.
    let device = vars.first().map_or(candle_core::Device::Cpu, |v| v.device().clone());
    let mut header: Vec<f32> = grads.iter().map(|g| g.is_some() as u8 as f32).collect();
    let high = loss as f32;
    header.extend([high, (loss - high as f64) as f32]);
    let header = world.all_reduce_sum(&Tensor::new(header, &device)?)?.to_vec1::<f32>()?;
    let ranges = buckets(&sizes, BUCKET_ELEMENTS);
    for range in &ranges {
        let parts = range
            .clone()
            .map(|i| match &grads[i] {
                Some(g) => Ok(g.flatten_all()?.to_dtype(DType::F32)?),
                None => Ok(Tensor::zeros(sizes[i], DType::F32, vars[i].device())?),
            })
            .collect::<Result<Vec<_>>>()?;
        let bucket = Tensor::cat(&parts, 0)?;
        let t = std::time::Instant::now();
        let summed = world.all_reduce_sum(&bucket)?;
        in_collective += t.elapsed();
        let mut at = 0;
        for i in range.clone() {
            if header[i] > 0.0 {
                let g = summed.narrow(0, at, sizes[i])?.reshape(vars[i].shape())?.to_dtype(vars[i].dtype())?;
                out[i] = Some(g);
            }
            at += sizes[i];
        }
    }
    if timing && world.is_root() {
        let mb = sizes.iter().sum::<usize>() as f64 * 4.0 / 1e6;
        eprintln!(
            "all-reduce: {mb:.1} MB of gradients in {} buckets, {:.3} s in {} ({:.3} s with packing; {:.3} s waiting for the other ranks before)",
            ranges.len(),
            in_collective.as_secs_f64(),
            world.name(),
            started.elapsed().as_secs_f64(),
            waited.as_secs_f64()
        );
    }
    Ok((header[vars.len()] as f64 + header[vars.len() + 1] as f64, out))
}

/// Sets every variable of `varmap` to rank 0's values (in buckets), so that all ranks start
/// alike; ranks whose variables differ (names, shapes) are an error.
pub fn broadcast_vars(world: &dyn Collective, varmap: &VarMap) -> Result<()> {
    if world.world_size() == 1 {
        return Ok(());
    }
    let mut named: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let signature: String = named.iter().map(|(k, v)| format!("{k}{:?};", v.dims())).collect();
    let all = world.all_gather_bytes(signature.as_bytes())?;
    if let Some(rank) = all.iter().position(|s| *s != all[0]) {
        bail!("rank {rank} has another model than rank 0 (other variables or shapes): every rank must build the same model");
    }
    let vars: Vec<&Var> = named.iter().map(|(_, v)| v).collect();
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    for range in buckets(&sizes, BUCKET_ELEMENTS) {
        let parts = range.clone().map(|i| vars[i].as_tensor().flatten_all()?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
        let root = world.broadcast(&Tensor::cat(&parts, 0)?)?;
        let mut at = 0;
        for i in range {
            vars[i].set(&root.narrow(0, at, sizes[i])?.reshape(vars[i].shape())?.to_dtype(vars[i].dtype())?)?;
            at += sizes[i];
        }
    }
    Ok(())
}

/// Rank 0's answer to a yes/no question (whether the time limit has passed, say), on every
/// rank: what must be decided alike everywhere, but that each rank's clock would answer alone.
pub fn rank0_says(world: &dyn Collective, yes: bool) -> Result<bool> {
    Ok(world.broadcast_bytes(vec![yes as u8])?.first() == Some(&1))
}

/// Every rank's evaluation outputs, in rank order, on every rank: each rank gives the outputs
/// of its batches, and receives all of them.
pub fn all_gather_eval(world: &dyn Collective, mine: Vec<EvalBatch>) -> Result<Vec<Vec<EvalBatch>>> {
    if world.world_size() == 1 {
        return Ok(vec![mine]);
    }
    world.all_gather_bytes(&encode(&mine)).and_then(|all| all.iter().map(|b| decode(b)).collect())
}

/// A little-endian byte form of evaluation outputs that decodes to the same values, bit for
/// bit (a JSON round trip would not promise that for floats).
fn encode(batches: &[EvalBatch]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = |out: &mut Vec<u8>, n: usize| out.extend((n as u64).to_le_bytes());
    len(&mut out, batches.len());
    for b in batches {
        out.extend(b.loss_sum.to_le_bytes());
        len(&mut out, b.count);
        for words in [&b.predictions, &b.targets] {
            len(&mut out, words.len());
            words.iter().for_each(|w| out.extend(w.to_le_bytes()));
        }
        for values in [&b.scores, &b.score_targets] {
            len(&mut out, values.len());
            values.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
    }
    out
}

fn decode(bytes: &[u8]) -> Result<Vec<EvalBatch>> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
            if self.0.len() < N {
                bail!("evaluation outputs from another rank are cut short");
            }
            let (head, tail) = self.0.split_at(N);
            self.0 = tail;
            Ok(head.try_into().expect("N bytes"))
        }
        fn len(&mut self) -> Result<usize> {
            Ok(u64::from_le_bytes(self.take()?) as usize)
        }
        fn words(&mut self) -> Result<Vec<u32>> {
            (0..self.len()?).map(|_| Ok(u32::from_le_bytes(self.take()?))).collect()
        }
        fn values(&mut self) -> Result<Vec<f32>> {
            (0..self.len()?).map(|_| Ok(f32::from_le_bytes(self.take()?))).collect()
        }
    }
    let mut r = Reader(bytes);
    (0..r.len()?)
        .map(|_| {
            Ok(EvalBatch {
                loss_sum: f64::from_le_bytes(r.take()?),
                count: r.len()?,
                predictions: r.words()?,
                targets: r.words()?,
                scores: r.values()?,
                score_targets: r.values()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_consecutive_and_reach_the_cap() {
        assert_eq!(buckets(&[3, 3, 3, 3, 1], 6), vec![0..2, 2..4, 4..5]);
        assert_eq!(buckets(&[10, 1, 1], 4), vec![0..1, 1..3]);
        assert_eq!(buckets(&[2, 2], 4), vec![0..2]);
        assert!(buckets(&[], 4).is_empty());
    }

    #[test]
    fn evaluation_outputs_survive_the_byte_form_bit_for_bit() -> Result<()> {
        let batches = vec![
            EvalBatch { loss_sum: 0.1 + 0.2, count: 3, predictions: vec![1, 0, 7], targets: vec![1, 1, u32::MAX], ..Default::default() },
            EvalBatch { loss_sum: -1e-300, count: 2, scores: vec![0.1, f32::MIN_POSITIVE], score_targets: vec![3.5, -0.0], ..Default::default() },
        ];
        let back = decode(&encode(&batches))?;
        assert_eq!(format!("{back:?}"), format!("{batches:?}"));
        assert_eq!(back[0].loss_sum.to_bits(), batches[0].loss_sum.to_bits());
        assert!(decode(&encode(&batches)[..20]).unwrap_err().to_string().contains("cut short"));
        Ok(())
    }

    #[test]
    fn one_process_keeps_its_gradients() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (a, b) = (Var::new(&[1f32, 2.0], &dev)?, Var::new(&[3f32], &dev)?);
        let grad = Tensor::new(&[0.5f32, 0.25], &dev)?;
        let (loss, grads) = all_reduce_grads(&super::super::Single, &[&a, &b], vec![Some(grad), None], 1.5)?;
        assert_eq!((loss, grads[0].as_ref().unwrap().to_vec1::<f32>()?, grads[1].is_none()), (1.5, vec![0.5, 0.25], true));
        Ok(())
    }
}

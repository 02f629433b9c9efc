//! Data-parallel training across processes, on the engines the field already trusts: MPI
//! (OpenMPI, through the `mpi` crate, `--features mpi`) for launching, rendezvous and CPU
//! gradients, NCCL (`--features nccl`) for gradients that live on GPUs. This is Horovod's and
//! PyTorch DDP's design; nothing here is a transport of its own.
//!
//! The [`Trainer`](crate::train::Trainer) talks to a [`Collective`]: [`Single`] (one process, every
//! operation a no-op: the default, nothing changes for a program that never starts MPI), [`Mpi`]
//! or [`Nccl`]. Each of the N ranks (processes) runs the same program on the same data:
//! - every global batch (the batch one process with the same seed and `batch_size` would draw,
//!   in the same order) is cut into N consecutive [`share`]s, one per rank; a batch that does not
//!   divide by N gives shares that differ by one item (each rank's gradient is weighted by its
//!   share of the items, so the step is still the one of the whole batch);
//! - the gradients of each optimizer step (after gradient accumulation, before clipping and the
//!   update) are summed across ranks in a few large buckets ([`sync::all_reduce_grads`]);
//! - the weights start as rank 0's (a broadcast), evaluation batches are spread over the ranks
//!   and their outputs gathered, so every rank computes the same metrics and takes the same
//!   decisions (best checkpoint, early stopping, time limit);
//! - rank 0 alone writes checkpoints, `metrics.jsonl`, the loss curve and the model folder, and
//!   alone prints: the standard output and error of the other ranks go to /dev/null
//!   ([`init`]), except the error that ends a rank.
//!
//! BatchNorm statistics stay local: each rank normalises with its own share's mean and variance
//! and keeps its own running statistics (rank 0's are the ones saved), as DDP does without
//! `SyncBatchNorm`. Dropout draws different masks on each rank.
//!
//! Failures: an error on any rank prints that rank's message and aborts the whole job
//! ([`Session::finish`] calls `MPI_Abort`), so no rank is left waiting in a collective. A rank
//! that dies (killed, crashed, or exited without finishing) is noticed by `mpirun` at once (on
//! one machine, through the process's exit; across machines, through its daemon's connection):
//! OpenMPI then kills every other rank and exits non-zero with "mpirun detected that one or more
//! processes exited with non-zero status" or "mpirun noticed that process rank N ... exited on
//! signal" (scripts/test-distributed.sh kills a rank mid-training: the job ends within about 2
//! s). There is no timeout to wait for; a
//! machine that vanishes from the network without closing its connections is noticed when TCP
//! gives up on it (minutes; OpenMPI's `oob_tcp_keepalive_*` settings shorten it).

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod sync;

#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
#[cfg(feature = "nccl")]
pub use self::nccl::Nccl;

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::{Arc, OnceLock};

/// The operations data-parallel training needs from the ranks of a job. Every rank must call
/// the same operations in the same order (a rank that calls one alone waits for the others).
pub trait Collective: Send + Sync {
    /// This process's rank, 0 to `world_size() - 1`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// The element-wise sum of every rank's `flat` (a 1-D f32 tensor of the same length on every
    /// rank), on every rank, on `flat`'s device.
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor>;
    /// Rank 0's `flat` (a 1-D f32 tensor of the same length on every rank), on every rank.
    fn broadcast(&self, flat: &Tensor) -> Result<Tensor>;
    /// Rank 0's bytes on every rank (the others' `bytes` are ignored; their lengths may differ).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Every rank's bytes (of any length), in rank order, on every rank.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// What runs the collectives, for messages ("one process", "MPI", "NCCL").
    fn name(&self) -> &'static str;
}

/// One process: world size 1, every collective returns its input.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn broadcast(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "one process"
    }
}

/// Rank `rank`'s share of a global batch split over `world` ranks: consecutive items, the first
/// `len % world` ranks taking one more. The shares, in rank order, are the batch.
pub fn share(batch: &[usize], rank: usize, world: usize) -> &[usize] {
    let bound = |r: usize| r * batch.len() / world;
    &batch[bound(rank)..bound(rank + 1)]
}

static WORLD: OnceLock<Arc<dyn Collective>> = OnceLock::new();

/// The job this process belongs to: what [`init`] set up, or [`Single`] (also in a program
/// that never calls it). A new [`Trainer`](crate::train::Trainer) takes it.
pub fn world() -> Arc<dyn Collective> {
    WORLD.get().cloned().unwrap_or_else(|| Arc::new(Single))
}

/// The number of processes `mpirun` (OpenMPI, or a PMI launcher: MPICH, Slurm's srun) started,
/// read from the environment it gives each rank; `None` when not launched that way.
pub fn launched_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// This process's rank among those of its machine (`OMPI_COMM_WORLD_LOCAL_RANK`, or MPICH's /
/// Slurm's equivalents), 0 when not launched by `mpirun`: the GPU `--device cuda` picks.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok()).unwrap_or(0)
}

/// The collective for tensors on `device`: in a build with NCCL, NCCL for a CUDA device of an
/// MPI job (one communicator per process, made on first use); `world` otherwise.
pub fn for_device(world: Arc<dyn Collective>, device: &candle_core::Device) -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() && world.name() == "MPI" {
        static NCCL: OnceLock<Arc<dyn Collective>> = OnceLock::new();
        if let Some(nccl) = NCCL.get() {
            return Ok(nccl.clone());
        }
        let nccl: Arc<dyn Collective> = Arc::new(Nccl::new(Mpi::world()?, device)?);
        return Ok(NCCL.get_or_init(|| nccl).clone());
    }
    let _ = device;
    Ok(world)
}

/// Kept alive while the job runs; dropping it finishes MPI (`MPI_Finalize`), which every rank
/// must reach.
pub struct Session {
    #[cfg(feature = "mpi")]
    _mpi: Option<::mpi::environment::Universe>,
}

/// Joins the job `mpirun` launched this process into (MPI's rendezvous), makes it the
/// [`world`] and quiets the standard output and error of ranks other than 0; does nothing when
/// not launched by `mpirun`. Launched by `mpirun -np N` (N > 1) without the `mpi` feature is an
/// error: N copies would each train the whole model alone.
pub fn init() -> Result<Session> {
    let launched = launched_world_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        // candle sizes its thread pool by the machine's physical cores, not by the cores mpirun
        // bound this rank to: N ranks of one machine would each run as many threads as it has.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            if let Ok(cores) = std::thread::available_parallelism() {
                std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
            }
        }
        let (universe, mpi) = Mpi::init()?;
        let world: Arc<dyn Collective> = Arc::new(mpi);
        if !world.is_root() {
            quiet_standard_streams()?;
        }
        if WORLD.set(world).is_err() {
            bail!("the distributed job was already set up");
        }
        return Ok(Session { _mpi: Some(universe) });
    }
    match launched {
        Some(n) if n > 1 => bail!(
            "this process is one of {n} that mpirun started, but this wick was built without MPI (the `mpi` cargo feature), \
             so each would train the whole model alone: build with `cargo build --release --features mpi`, or run without mpirun"
        ),
        _ => Ok(Session {
            #[cfg(feature = "mpi")]
            _mpi: None,
        }),
    }
}

/// The standard error of this process as it was before [`init`] quieted it.
#[cfg(feature = "mpi")]
static STDERR: OnceLock<i32> = OnceLock::new();

/// Points the standard output and error at /dev/null, keeping a copy of standard error for
/// [`Session::finish`].
#[cfg(feature = "mpi")]
fn quiet_standard_streams() -> Result<()> {
    // SAFETY: plain POSIX calls on descriptors this process owns; no Rust object holds them.
    unsafe {
        let saved = libc::dup(2);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if saved < 0 || null < 0 || libc::dup2(null, 1) < 0 || libc::dup2(null, 2) < 0 {
            bail!("cannot quiet the output of rank > 0: {}", std::io::Error::last_os_error());
        }
        libc::close(null);
        let _ = STDERR.set(saved);
    }
    Ok(())
}

impl Session {
    /// What a command that ran in this session returns. An error in a job of several ranks is
    /// printed here (with the rank, on the standard error even of a quieted rank) and aborts the
    /// whole job (`MPI_Abort`), so that no other rank waits forever for this one; it never
    /// returns then. Otherwise `result` as it is, and MPI finalised (when it ran).
    pub fn finish<T>(self, result: Result<T>) -> Result<T> {
        #[cfg(feature = "mpi")]
        if let (Err(err), Some(_)) = (&result, &self._mpi) {
            let world = world();
            if world.world_size() > 1 {
                let line = format!("error (rank {} of {}): {err:#}\n", world.rank(), world.world_size());
                match STDERR.get() {
                    // SAFETY: `fd` is the descriptor `quiet_standard_streams` kept open.
                    Some(&fd) => unsafe {
                        libc::write(fd, line.as_ptr().cast(), line.len());
                    },
                    None => eprint!("{line}"),
                }
                Mpi::abort(1);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shares_cut_every_batch_into_consecutive_nearly_equal_parts() {
        for len in 0..12 {
            let batch: Vec<usize> = (100..100 + len).collect();
            for world in 1..5 {
                let shares: Vec<&[usize]> = (0..world).map(|r| share(&batch, r, world)).collect();
                assert_eq!(shares.concat(), batch, "len {len} world {world}");
                let sizes: Vec<usize> = shares.iter().map(|s| s.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            }
        }
        assert_eq!(share(&[1, 2, 3, 4], 1, 2), &[3, 4]);
        assert_eq!(share(&[7], 0, 1), &[7]);
    }

    #[test]
    fn the_single_collective_is_one_rank_that_returns_its_input() -> Result<()> {
        let single = Single;
        assert_eq!((single.rank(), single.world_size(), single.is_root()), (0, 1, true));
        let x = Tensor::new(&[1f32, -2.5, 3.0], &Device::Cpu)?;
        assert_eq!(single.all_reduce_sum(&x)?.to_vec1::<f32>()?, vec![1.0, -2.5, 3.0]);
        assert_eq!(single.broadcast(&x)?.to_vec1::<f32>()?, vec![1.0, -2.5, 3.0]);
        assert_eq!(single.broadcast_bytes(vec![4, 5])?, vec![4, 5]);
        assert_eq!(single.all_gather_bytes(&[6])?, vec![vec![6]]);
        single.barrier()?;
        assert_eq!(world().world_size(), 1, "no job was set up: one process");
        Ok(())
    }
}

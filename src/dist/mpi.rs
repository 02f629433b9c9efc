//! The [`Collective`] of the processes `mpirun` launched, over MPI's world communicator
//! (`--features mpi`). Tensors are reduced on the host: a CUDA tensor is copied to the CPU and
//! back (the NCCL collective keeps them on the GPU).

use super::Collective;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};
use mpi::Count;

/// This process's place in MPI's world communicator. It holds no MPI object (only MPI's own
/// `MPI_COMM_WORLD`, looked up on each call), so it can be shared between threads; MPI must
/// stay initialised while it is used ([`super::Session`] keeps it so).
#[derive(Clone, Copy, Debug)]
pub struct Mpi {
    rank: usize,
    size: usize,
}

impl Mpi {
    /// Initialises MPI (the rendezvous with the other ranks `mpirun` started) and returns its
    /// universe, which finalises MPI when dropped, and this process's place in the world.
    pub fn init() -> Result<(Universe, Mpi)> {
        let universe = mpi::initialize().context("MPI was already initialised in this process")?;
        let world = universe.world();
        Ok((universe, Mpi { rank: world.rank() as usize, size: world.size() as usize }))
    }

    /// This process's place in the world of an MPI initialised elsewhere (by a test, say).
    pub fn world() -> Result<Mpi> {
        if !mpi::environment::is_initialized() {
            bail!("MPI is not initialised (dist::init or mpi::initialize first)");
        }
        let world = SimpleCommunicator::world();
        Ok(Mpi { rank: world.rank() as usize, size: world.size() as usize })
    }

    /// Ends every rank of the job with `code` (MPI_Abort): what a failing rank does so that the
    /// others do not wait for it forever.
    pub fn abort(code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }

    fn comm(&self) -> SimpleCommunicator {
        SimpleCommunicator::world()
    }
}

/// A 1-D f32 tensor's values on the host, checked to be one.
fn host_f32(flat: &Tensor) -> Result<Vec<f32>> {
    if flat.rank() != 1 || flat.dtype() != DType::F32 {
        bail!("collectives take a flat f32 tensor, got {:?} {:?}", flat.dims(), flat.dtype());
    }
    Ok(flat.to_vec1::<f32>()?)
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let mine = host_f32(flat)?;
        let mut sum = vec![0f32; mine.len()];
        self.comm().all_reduce_into(&mine[..], &mut sum[..], SystemOperation::sum());
        Ok(Tensor::from_vec(sum, mine.len(), flat.device())?)
    }
    fn broadcast(&self, flat: &Tensor) -> Result<Tensor> {
        let mut values = host_f32(flat)?;
        self.comm().process_at_rank(0).broadcast_into(&mut values[..]);
        Ok(Tensor::from_vec(values, flat.dims1()?, flat.device())?)
    }
    fn broadcast_bytes(&self, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
        let comm = self.comm();
        let root = comm.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(bytes)
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let comm = self.comm();
        let my_len = Count::try_from(mine.len()).context("more than 2 GiB to gather from one rank")?;
        let mut lens: Vec<Count> = vec![0; self.size];
        comm.all_gather_into(&my_len, &mut lens[..]);
        let displs: Vec<Count> = lens.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        let mut all = vec![0u8; lens.iter().map(|&n| n as usize).sum()];
        comm.all_gather_varcount_into(mine, &mut PartitionMut::new(&mut all[..], &lens[..], &displs[..]));
        let mut rest = &all[..];
        Ok(lens
            .iter()
            .map(|&n| {
                let (part, tail) = rest.split_at(n as usize);
                rest = tail;
                part.to_vec()
            })
            .collect())
    }
    fn barrier(&self) -> Result<()> {
        self.comm().barrier();
        Ok(())
    }
    fn name(&self) -> &'static str {
        "MPI"
    }
}

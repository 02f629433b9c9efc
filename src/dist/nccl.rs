//! The [`Collective`] of ranks whose gradients live on GPUs (`--features nccl`): one process per
//! GPU, launched by `mpirun` as for MPI; NCCL sums and broadcasts the tensors on the GPUs, MPI
//! does the rest (rendezvous, NCCL's unique id from rank 0, the small byte messages).

use super::{Collective, Mpi};
use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use std::sync::Mutex;

/// A NCCL communicator over the ranks of the MPI world, one GPU each.
pub struct Nccl {
    mpi: Mpi,
    comm: Mutex<SendComm>,
}

/// NCCL's communicator holds a raw handle, which NCCL lets any one thread use at a time (the
/// mutex above sees to that).
struct SendComm(Comm);
// SAFETY: see above; the handle is never used by two threads at once.
unsafe impl Send for SendComm {}

impl Nccl {
    /// The communicator of the MPI world `mpi`, this rank on `device` (a CUDA device, not one
    /// another rank uses): rank 0 makes NCCL's unique id and broadcasts it over MPI.
    pub fn new(mpi: Mpi, device: &Device) -> Result<Nccl> {
        let Device::Cuda(cuda) = device else { bail!("NCCL needs a CUDA device (--device cuda), not {device:?}") };
        let id = match mpi.is_root() {
            true => Id::new().map_err(|e| anyhow!("NCCL could not make its unique id: {e:?}"))?,
            false => Id::uninit([0; 128]),
        };
        let root_id = mpi.broadcast_bytes(id.internal().iter().map(|&c| c as u8).collect())?;
        let internal: [std::ffi::c_char; 128] = std::array::from_fn(|i| root_id[i] as std::ffi::c_char);
        let comm = Comm::from_rank(cuda.cuda_stream(), mpi.rank(), mpi.world_size(), Id::uninit(internal))
            .map_err(|e| anyhow!("NCCL could not join rank {} of {}: {e:?}", mpi.rank(), mpi.world_size()))?;
        Ok(Nccl { mpi, comm: Mutex::new(SendComm(comm)) })
    }

    fn run(&self, flat: &Tensor, op: Op) -> Result<Tensor> {
        if flat.rank() != 1 || flat.dtype() != candle_core::DType::F32 || !flat.device().is_cuda() {
            bail!("NCCL collectives take a flat f32 CUDA tensor, got {:?} {:?} on {:?}", flat.dims(), flat.dtype(), flat.device());
        }
        let comm = self.comm.lock().map_err(|_| anyhow!("the NCCL communicator was poisoned by a panic"))?;
        Ok(flat.apply_op1_no_bwd(&OnGpu { comm: &comm.0, op })?)
    }
}

#[derive(Clone, Copy)]
enum Op {
    Sum,
    BroadcastFromRoot,
}

/// A NCCL collective as a candle op, which is how candle hands out a tensor's GPU buffer.
struct OnGpu<'a> {
    comm: &'a Comm,
    op: Op,
}

impl CustomOp1 for OnGpu<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL runs on CUDA tensors only")
    }
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("NCCL needs a contiguous tensor") };
        let input = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let device = storage.device.clone();
        let mut output = device.alloc_zeros::<f32>(end - start)?;
        let nccl = |e| candle_core::Error::Msg(format!("NCCL: {e:?}"));
        match self.op {
            Op::Sum => self.comm.all_reduce(&input, &mut output, &ReduceOp::Sum).map_err(nccl)?,
            Op::BroadcastFromRoot => self.comm.broadcast(Some(&input), &mut output, 0).map_err(nccl)?,
        };
        Ok((CudaStorage::wrap_cuda_slice(output, device), layout.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        self.run(flat, Op::Sum)
    }
    fn broadcast(&self, flat: &Tensor) -> Result<Tensor> {
        self.run(flat, Op::BroadcastFromRoot)
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.mpi.broadcast_bytes(bytes)
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.mpi.all_gather_bytes(mine)
    }
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
    fn name(&self) -> &'static str {
        "NCCL"
    }
}

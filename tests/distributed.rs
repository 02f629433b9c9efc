//! Data-parallel training across MPI ranks, checked the way PyTorch's DDP tests check theirs:
//! N ranks with global batch B must train as one process with batch B does. Run by
//! `scripts/test-distributed.sh`, under `mpirun -np 2`; each rank runs this same test (one test,
//! so that the ranks' collectives come in the same order) and compares its own single-process
//! reference run with the distributed run.
//!
//! Tolerance: the distributed run sums each gradient as (rank 0's share) + (rank 1's share)
//! where one process sums all the items at once, so the last bits of the gradients differ
//! (float addition is not associative); AdamW then carries those differences along. The losses
//! must agree to 1e-5 (relative) and the weights to 1e-5 (absolute, weights of order 0.1-1) after
//! the steps below; every rank must hold bit-identical weights.
//!
//! Without the `mpi` feature (plain `cargo test`) only the refusal to run under mpirun is
//! checked here.

/// Launched by mpirun (which its environment shows) in a build without MPI: a clear error, not
/// N processes each training the whole model alone.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_launch_by_mpirun_without_the_mpi_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("text.txt"), "to be or not to be, that is the question. ".repeat(20)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["train", "char-rnn", "--steps", "2", "--data"])
        .arg(dir.path().join("text.txt"))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("one of 2 that mpirun started") && stderr.contains("--features mpi"), "{stderr}");
}

#[cfg(feature = "mpi")]
mod ranks {
    use anyhow::Result;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use wick::data::TensorDataset;
    use wick::dist::{Collective, Mpi, Single};
    use wick::models::mlp::{Mlp, MlpConfig};
    use wick::train::tasks::Classifier;
    use wick::train::{checkpoint, optim, MetricGoal, OptimizerConfig, Schedule, TrainReport, Trainer, TrainerConfig};

    /// Two Gaussian blobs per class in 8 dimensions, 4 classes (as in tests/trainer.rs).
    fn blobs(n: usize, seed: u64) -> Result<TensorDataset> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut xs, mut ys) = (Vec::with_capacity(n * 8), Vec::with_capacity(n));
        for _ in 0..n {
            let class = rng.random_range(0..4u32);
            for d in 0..8 {
                xs.push(if d % 4 == class as usize { 2.0 } else { 0.0 } + rng.random::<f32>() * 2.0 - 1.0);
            }
            ys.push(class);
        }
        Ok(TensorDataset::new(Tensor::from_vec(xs, (n, 8), &Device::Cpu)?, Tensor::from_vec(ys, n, &Device::Cpu)?)?)
    }

    /// Trains a fresh MLP (dropout off) initialised from `init_seed` on `world`.
    fn train(world: Arc<dyn Collective>, init_seed: u64, config: TrainerConfig, data: &TensorDataset, eval: &TensorDataset) -> Result<(TrainReport, VarMap)> {
        let varmap = VarMap::new();
        let vb = wick::nn::var_builder(&varmap, DType::F32, &Device::Cpu, init_seed);
        let model = Classifier { net: Mlp::load(vb, &MlpConfig::new(8, &[32, 16], 4))?, num_classes: 4 };
        let opt = OptimizerConfig::adamw(0.01).build(optim::params(&varmap, optim::is_bias_or_norm))?;
        let mut trainer = Trainer::new(TrainerConfig { progress: false, ..config }, varmap, opt, Device::Cpu);
        trainer.world = world;
        Ok((trainer.fit(&model, data, Some(eval))?, trainer.varmap))
    }

    fn weights(varmap: &VarMap) -> Result<Vec<(String, Vec<f32>)>> {
        let mut all: Vec<_> = checkpoint::varmap_tensors(varmap)?.into_iter().map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?))).collect::<Result<_>>()?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// The largest difference between two runs' weights.
    fn max_weight_diff(a: &VarMap, b: &VarMap) -> Result<f32> {
        let (a, b) = (weights(a)?, weights(b)?);
        assert_eq!(a.iter().map(|w| &w.0).collect::<Vec<_>>(), b.iter().map(|w| &w.0).collect::<Vec<_>>());
        Ok(a.iter().zip(&b).flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max))
    }

    /// The distributed run must match the single-process one: losses, evaluations, weights; and
    /// every rank must hold the same weights, bit for bit.
    fn check_same_run(world: &Mpi, what: &str, single: &(TrainReport, VarMap), dist: &(TrainReport, VarMap)) -> Result<()> {
        let (s, d) = (&single.0, &dist.0);
        assert_eq!(s.train_losses.len(), d.train_losses.len(), "{what}: steps");
        let mut worst = 0f64;
        for ((step, a), (_, b)) in s.train_losses.iter().zip(&d.train_losses) {
            let rel = (a - b).abs() / a.abs().max(1e-12);
            assert!(rel < 1e-5, "{what}: step {step} loss {b} on {} ranks, {a} in one process", world.world_size());
            worst = worst.max(rel);
        }
        assert_eq!(s.evals.len(), d.evals.len(), "{what}: evaluations");
        for ((step, a), (_, b)) in s.evals.iter().zip(&d.evals) {
            for (name, x) in a {
                assert!((x - b[name]).abs() < 1e-5, "{what}: step {step} eval {name} {} vs {x}", b[name]);
            }
        }
        let diff = max_weight_diff(&single.1, &dist.1)?;
        assert!(diff < 1e-5, "{what}: final weights differ by {diff}");
        let mine: Vec<u8> = weights(&dist.1)?.iter().flat_map(|(_, w)| w.iter().flat_map(|x| x.to_le_bytes())).collect();
        let all = world.all_gather_bytes(&mine)?;
        assert!(all.iter().all(|w| *w == mine), "{what}: the ranks' weights differ");
        if world.is_root() {
            println!("{what}: {} steps, largest loss difference {worst:.2e} (relative), largest weight difference {diff:.2e}", s.train_losses.len());
        }
        Ok(())
    }

    /// A folder every rank sees (rank 0 makes it and sends its path), removed by rank 0 at the end.
    fn shared_dir(world: &Mpi) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
        let dir = if world.is_root() { Some(tempfile::tempdir()?) } else { None };
        let path = dir.as_ref().map(|d| d.path().to_string_lossy().into_owned()).unwrap_or_default();
        Ok((dir, PathBuf::from(String::from_utf8(world.broadcast_bytes(path.into_bytes())?)?)))
    }

    fn only_rank0_wrote(world: &Mpi, out: &Path) -> Result<()> {
        world.barrier()?;
        if world.is_root() {
            let steps: Vec<usize> = checkpoint::list(out)?.into_iter().map(|(s, _)| s).collect();
            assert!(!steps.is_empty() && out.join("metrics.jsonl").is_file() && out.join("loss_curve.svg").is_file(), "{steps:?}");
            let state = checkpoint::read_state(&checkpoint::latest(out)?.unwrap())?;
            assert_eq!(state.order.world_size, Some(world.world_size()));
            // One line per logged step: a second writer would have doubled them.
            let lines = std::fs::read_to_string(out.join("metrics.jsonl"))?.lines().filter(|l| l.contains("\"train\"")).count();
            assert_eq!(lines, state.step / 2 + usize::from(state.step % 2 == 1), "log_every 2");
        }
        Ok(())
    }

    #[test]
    fn ranks_train_as_one_process_with_the_same_global_batch() {
        let (universe, world) = Mpi::init().expect("MPI starts");
        // A failure on one rank aborts the job: the other rank would wait for it forever.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            Mpi::abort(101);
        }));
        if let Err(err) = same_runs(world) {
            eprintln!("rank {}: {err:#}", world.rank());
            Mpi::abort(1);
        }
        drop(universe);
    }

    fn same_runs(world: Mpi) -> Result<()> {
        assert!(world.world_size() > 1, "run under mpirun -np 2 (scripts/test-distributed.sh)");
        let rank_world: Arc<dyn Collective> = Arc::new(world);
        let (data, eval) = (blobs(96, 1)?, blobs(40, 2)?);
        let base = TrainerConfig {
            epochs: 2,
            batch_size: 16,
            eval_batch_size: 8,
            eval_every: Some(4),
            lr: 5e-3,
            max_grad_norm: Some(0.5),
            schedule: Schedule::CosineWarmup { warmup: 2, min_ratio: 0.1 },
            goal: Some(MetricGoal::maximize("accuracy")),
            log_every: 2,
            seed: 7,
            ..Default::default()
        };
        // Rank 1 starts from other weights: the broadcast from rank 0 must replace them.
        let init = 3 + world.rank() as u64;
        for (what, config) in [
            ("batch 16", base.clone()),
            ("batch 4 x 4 accumulated", TrainerConfig { batch_size: 4, grad_accum: 4, ..base.clone() }),
            // 96 = 6 x 13 + 18: every batch splits 6 + 7, the last 9 + 9.
            ("batch 13 (uneven shares)", TrainerConfig { batch_size: 13, ..base.clone() }),
        ] {
            let single = train(Arc::new(Single), 3, config.clone(), &data, &eval)?;
            let dist = train(rank_world.clone(), init, config, &data, &eval)?;
            check_same_run(&world, what, &single, &dist)?;
        }

        // Checkpoints: rank 0 alone writes; a resume with as many ranks continues the same run; a
        // resume with another number of processes is refused.
        let (_keep, out) = shared_dir(&world)?;
        let with_output = |halt: Option<usize>, resume: bool| TrainerConfig { output_dir: Some(out.clone()), halt_at_step: halt, resume, ..base.clone() };
        let whole = train(rank_world.clone(), init, base.clone(), &data, &eval)?;
        train(rank_world.clone(), init, with_output(Some(5), false), &data, &eval)?;
        let resumed = train(rank_world.clone(), init, with_output(None, true), &data, &eval)?;
        assert_eq!(max_weight_diff(&whole.1, &resumed.1)?, 0.0, "resumed with the same ranks");
        assert_eq!(resumed.0.resumed_from, Some(5));
        only_rank0_wrote(&world, &out)?;
        if world.is_root() {
            let err = format!("{:#}", train(Arc::new(Single), 3, with_output(None, true), &data, &eval).err().expect("refused"));
            assert!(err.contains(&format!("number of processes (mpirun -np) was {} in the run being resumed, now 1", world.world_size())), "{err}");
        }
        world.barrier()?;
        Ok(())
    }
}

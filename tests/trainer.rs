//! The shared training loop: it learns, it resumes exactly, it stops cleanly on bad losses.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use wick::data::TensorDataset;
use wick::models::mlp::{Mlp, MlpConfig};
use wick::train::tasks::Classifier;
use wick::train::{checkpoint, optim, MetricGoal, OptimizerConfig, Schedule, TrainReport, Trainer, TrainerConfig};

/// Two Gaussian blobs per class in 8 dimensions, 4 classes: learnable, not trivial.
fn blobs(n: usize, seed: u64) -> Result<TensorDataset> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(n * 8);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let class = rng.random_range(0..4u32);
        for d in 0..8 {
            let center = if d % 4 == class as usize { 2.0 } else { 0.0 };
            xs.push(center + rng.random::<f32>() * 2.0 - 1.0);
        }
        ys.push(class);
    }
    Ok(TensorDataset::new(Tensor::from_vec(xs, (n, 8), &Device::Cpu)?, Tensor::from_vec(ys, n, &Device::Cpu)?)?)
}

fn model(varmap: &VarMap, dropout: f64) -> Result<Classifier<Mlp>> {
    let device = wick::device::test_device()?;
    let vb = wick::nn::var_builder(varmap, DType::F32, &device, 0);
    let cfg = MlpConfig { dropout, ..MlpConfig::new(8, &[32, 16], 4) };
    Ok(Classifier { net: Mlp::load(vb, &cfg)?, num_classes: 4 })
}

/// A fresh model and a trainer for it (AdamW, no progress bar).
fn new_trainer(config: TrainerConfig, dropout: f64) -> Result<(Classifier<Mlp>, Trainer)> {
    let varmap = VarMap::new();
    let m = model(&varmap, dropout)?;
    let opt = OptimizerConfig::adamw(0.01).build(optim::params(&varmap, optim::is_bias_or_norm))?;
    Ok((m, Trainer::new(TrainerConfig { progress: false, ..config }, varmap, opt, wick::device::test_device()?)))
}

fn train(config: TrainerConfig, dropout: f64, data: &TensorDataset, eval: Option<&TensorDataset>) -> Result<(TrainReport, VarMap)> {
    let (m, mut trainer) = new_trainer(config, dropout)?;
    Ok((trainer.fit(&m, data, eval)?, trainer.varmap))
}

fn train_err(config: TrainerConfig, data: &TensorDataset, eval: Option<&TensorDataset>) -> String {
    format!("{:#}", train(config, 0.0, data, eval).err().expect("training must fail"))
}

#[test]
fn learns_a_synthetic_task() -> Result<()> {
    let (data, eval) = (blobs(512, 1)?, blobs(256, 2)?);
    let cfg = TrainerConfig { epochs: 8, batch_size: 32, lr: 1e-2, schedule: Schedule::LinearWarmup { warmup: 10 }, ..Default::default() };
    let (report, _) = train(cfg, 0.1, &data, Some(&eval))?;
    let first = report.train_losses[0].1;
    let m = report.last_eval().unwrap();
    assert!(first > 1.2, "initial loss {first} should be near ln 4");
    assert!(m["loss"] < 0.25, "eval loss {} after training", m["loss"]);
    assert!(m["accuracy"] > 0.93, "eval accuracy {}", m["accuracy"]);
    assert_eq!(report.steps, 8 * 16);
    assert_eq!(report.evals.len(), 8);
    Ok(())
}

#[test]
fn resume_continues_the_same_loss_curve() -> Result<()> {
    let data = blobs(200, 3)?;
    let base = TrainerConfig {
        epochs: 3,
        batch_size: 16,
        grad_accum: 2,
        lr: 5e-3,
        max_grad_norm: Some(1.0),
        schedule: Schedule::CosineWarmup { warmup: 3, min_ratio: 0.1 },
        seed: 11,
        ..Default::default()
    };
    let full_dir = tempfile::tempdir()?;
    let (full, full_vars) = train(TrainerConfig { output_dir: Some(full_dir.path().into()), ..base.clone() }, 0.2, &data, None)?;

    // Interrupted in the middle of epoch 2 (steps per epoch: 13 batches / 2 = 7), then resumed.
    let dir = tempfile::tempdir()?;
    let first_cfg = TrainerConfig { output_dir: Some(dir.path().into()), halt_at_step: Some(9), ..base.clone() };
    let (first, _) = train(first_cfg, 0.2, &data, None)?;
    assert!(first.halted);
    assert_eq!(first.steps, 9);
    let (second, resumed_vars) = train(TrainerConfig { output_dir: Some(dir.path().into()), resume: true, ..base }, 0.2, &data, None)?;
    assert_eq!(second.resumed_from, Some(9));
    let stitched: Vec<(usize, f64)> = first.train_losses.iter().chain(&second.train_losses).copied().collect();
    assert_eq!(stitched, full.train_losses, "resumed losses differ from the uninterrupted run");
    let (a, b) = (checkpoint::varmap_tensors(&full_vars)?, checkpoint::varmap_tensors(&resumed_vars)?);
    for (name, t) in &a {
        let diff = (t - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name} differs after resume");
    }
    // The metrics log holds one curve: each step once.
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl"))?;
    let steps: Vec<u64> = log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "log steps {steps:?}");
    assert!(dir.path().join("loss_curve.svg").is_file());
    Ok(())
}

#[test]
fn gradient_accumulation_equals_one_big_batch() -> Result<()> {
    let data = blobs(64, 4)?;
    let base = TrainerConfig { epochs: 1, max_steps: Some(3), lr: 1e-2, seed: 5, ..Default::default() };
    let (big, vars_big) = train(TrainerConfig { batch_size: 16, ..base.clone() }, 0.0, &data, None)?;
    let (small, vars_small) = train(TrainerConfig { batch_size: 4, grad_accum: 4, ..base }, 0.0, &data, None)?;
    for ((_, a), (_, b)) in big.train_losses.iter().zip(&small.train_losses) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let (a, b) = (checkpoint::varmap_tensors(&vars_big)?, checkpoint::varmap_tensors(&vars_small)?);
    for (name, t) in &a {
        let diff = (t - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    Ok(())
}

#[test]
fn nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint() -> Result<()> {
    let data = blobs(64, 5)?;
    // A learning rate of 1e30 sends the weights to ~1e30 in one step: the next loss overflows.
    let dir = tempfile::tempdir()?;
    let cfg = TrainerConfig { epochs: 2, batch_size: 8, lr: 1e30, save_every: Some(1), keep_last: 1, output_dir: Some(dir.path().into()), ..Default::default() };
    let err = train(cfg, 0.0, &data, None).err().expect("a NaN loss must stop training").to_string();
    assert!(err.contains("loss is") && err.contains("at step 2"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let (step, last) = checkpoint::list(dir.path())?.pop().expect("a checkpoint before the NaN");
    assert!(err.contains(&format!("step {}", step + 1)), "{err} / checkpoint {step}");
    assert_eq!(step, 1);
    // The checkpoint is whole and loads.
    let varmap = VarMap::new();
    let _m = model(&varmap, 0.0)?;
    checkpoint::load_varmap(&varmap, &last.join("model.safetensors"))?;
    Ok(())
}

#[test]
fn keeps_the_last_k_and_the_best_checkpoint_and_stops_early() -> Result<()> {
    let (data, eval) = (blobs(64, 6)?, blobs(32, 7)?);
    let dir = tempfile::tempdir()?;
    // A learning rate this small changes nothing measurable: the first evaluation stays best.
    let cfg = TrainerConfig {
        epochs: 20,
        batch_size: 16,
        lr: 1e-12,
        goal: Some(MetricGoal::minimize("loss")),
        early_stopping_patience: Some(3),
        eval_every: Some(2),
        eval_each_epoch: false,
        save_every: Some(1),
        keep_last: 2,
        output_dir: Some(dir.path().into()),
        ..Default::default()
    };
    let (report, _) = train(cfg, 0.0, &data, Some(&eval))?;
    assert!(report.stopped_early);
    let steps: Vec<usize> = checkpoint::list(dir.path())?.into_iter().map(|(s, _)| s).collect();
    let best = report.best.unwrap().0;
    assert!(steps.contains(&best), "best step {best} not kept: {steps:?}");
    assert!(steps.len() <= 3, "{steps:?}");
    assert!(report.best_checkpoint.is_some());
    // No temporary folders are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))?.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty());
    Ok(())
}

#[test]
fn bad_input_is_an_error_not_a_panic() -> Result<()> {
    let data = blobs(16, 8)?;
    let empty = data.take(0)?;
    let err = train(TrainerConfig::default(), 0.0, &empty, None).err().unwrap().to_string();
    assert!(err.contains("empty"), "{err}");
    let err = train(TrainerConfig { lr: f64::NAN, ..Default::default() }, 0.0, &data, None).err().unwrap().to_string();
    assert!(err.contains("learning rate"), "{err}");
    let err = train(TrainerConfig { resume: true, ..Default::default() }, 0.0, &data, None).err().unwrap().to_string();
    assert!(err.contains("output directory"), "{err}");
    for (cfg, name) in [
        (TrainerConfig { batch_size: 0, ..Default::default() }, "batch_size"),
        (TrainerConfig { eval_every: Some(0), ..Default::default() }, "eval_every"),
        (TrainerConfig { save_every: Some(0), ..Default::default() }, "save_every"),
    ] {
        let err = train(cfg, 0.0, &data, None).err().unwrap().to_string();
        assert!(err.contains(name) && err.contains("at least 1"), "{err}");
    }
    // A corrupt checkpoint is a clear error on resume.
    let dir = tempfile::tempdir()?;
    train(TrainerConfig { output_dir: Some(dir.path().into()), ..Default::default() }, 0.0, &data, None)?;
    let (_, last) = checkpoint::list(dir.path())?.pop().unwrap();
    std::fs::write(last.join("model.safetensors"), b"not a safetensors file")?;
    let err = format!("{:#}", train(TrainerConfig { output_dir: Some(dir.path().into()), resume: true, ..Default::default() }, 0.0, &data, None).err().unwrap());
    assert!(err.contains("model.safetensors"), "{err}");
    // A new run never overwrites or prunes an earlier run's checkpoints.
    let err = train(TrainerConfig { output_dir: Some(dir.path().into()), ..Default::default() }, 0.0, &data, None).err().unwrap().to_string();
    assert!(err.contains("already holds checkpoints"), "{err}");
    Ok(())
}

#[test]
fn resuming_a_finished_run_trains_no_further() -> Result<()> {
    let (data, eval) = (blobs(64, 9)?, blobs(32, 10)?);
    let dir = tempfile::tempdir()?;
    let cfg = TrainerConfig { epochs: 2, batch_size: 16, output_dir: Some(dir.path().into()), ..Default::default() };
    let (done, _) = train(cfg.clone(), 0.0, &data, Some(&eval))?;
    let log_before = std::fs::read_to_string(dir.path().join("metrics.jsonl"))?;
    let (again, _) = train(TrainerConfig { resume: true, ..cfg }, 0.0, &data, Some(&eval))?;
    assert_eq!(again.resumed_from, Some(done.steps));
    assert!(again.train_losses.is_empty());
    assert_eq!(again.last_eval().unwrap()["loss"], done.last_eval().unwrap()["loss"]);
    assert_eq!(std::fs::read_to_string(dir.path().join("metrics.jsonl"))?, log_before);
    Ok(())
}

#[test]
fn restore_best_loads_the_best_checkpoint_and_evaluate_reads_the_whole_set() -> Result<()> {
    let (data, eval) = (blobs(64, 12)?, blobs(40, 13)?);
    let dir = tempfile::tempdir()?;
    let cfg = TrainerConfig {
        epochs: 6,
        batch_size: 16,
        lr: 3e-2,
        eval_batch_size: 16,
        max_eval_batches: Some(1),
        goal: Some(MetricGoal::maximize("accuracy")),
        keep_last: 1,
        output_dir: Some(dir.path().into()),
        ..Default::default()
    };
    let (m, mut trainer) = new_trainer(cfg, 0.0)?;
    let report = trainer.fit(&m, &data, Some(&eval))?;
    let (best_step, _) = report.best.expect("evaluated");
    assert_eq!(trainer.restore_best()?, Some(best_step));
    let best = checkpoint::read_safetensors(&report.best_checkpoint.unwrap().join(checkpoint::MODEL_FILE), &candle_core::Device::Cpu)?;
    for (name, t) in checkpoint::varmap_tensors(&trainer.varmap)? {
        let diff = (t.to_device(&candle_core::Device::Cpu)? - &best[&name])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}");
    }
    // During training one batch of 16 is evaluated; `evaluate` reads all 40 items.
    let during = report.evals.last().unwrap().1["accuracy"] * 16.0;
    let whole = trainer.evaluate(&m, &eval)?["accuracy"] * 40.0;
    assert!((during - during.round()).abs() < 1e-9 && (whole - whole.round()).abs() < 1e-9, "{during} {whole}");
    // Without an output folder there is nothing to restore, and the weights stay.
    let (_, plain) = new_trainer(TrainerConfig::default(), 0.0)?;
    assert_eq!(plain.restore_best()?, None);
    Ok(())
}

#[test]
fn a_resume_that_would_replay_other_batches_is_refused_naming_the_setting() -> Result<()> {
    let data = blobs(48, 14)?;
    let dir = tempfile::tempdir()?;
    let base = TrainerConfig { epochs: 2, batch_size: 8, grad_accum: 2, seed: 3, halt_at_step: Some(2), output_dir: Some(dir.path().into()), ..Default::default() };
    train(base.clone(), 0.0, &data, None)?;
    let resume = TrainerConfig { resume: true, halt_at_step: None, ..base };
    for (cfg, data, expected) in [
        (TrainerConfig { batch_size: 16, ..resume.clone() }, data.take(48)?, "--batch-size was 8 in the run being resumed, now 16"),
        (TrainerConfig { grad_accum: 1, ..resume.clone() }, data.take(48)?, "was 2 in the run being resumed, now 1"),
        (TrainerConfig { seed: 4, ..resume.clone() }, data.take(48)?, "--seed was 3 in the run being resumed, now 4"),
        (TrainerConfig { drop_last: true, ..resume.clone() }, data.take(48)?, "drop_last was false in the run being resumed, now true"),
        (resume.clone(), data.take(40)?, "the training set's size (items) was 48 in the run being resumed, now 40"),
    ] {
        let err = train_err(cfg, &data, None);
        assert!(err.contains(expected) && err.contains("step-00000002"), "{err}");
    }
    // A trainer_state.json from before these were recorded: unknown, accepted (and recorded on).
    let (_, last) = checkpoint::list(dir.path())?.pop().unwrap();
    let state_file = last.join(checkpoint::STATE_FILE);
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_file)?)?;
    for field in ["batch_size", "grad_accum", "drop_last", "train_len", "first_loss", "smoothed_loss"] {
        old.as_object_mut().unwrap().remove(field).expect(field);
    }
    std::fs::write(&state_file, old.to_string())?;
    let (report, _) = train(TrainerConfig { batch_size: 16, grad_accum: 1, ..resume }, 0.0, &data, None)?;
    assert_eq!(report.resumed_from, Some(2));
    let saved = checkpoint::read_state(&checkpoint::latest(dir.path())?.unwrap())?;
    assert_eq!((saved.order.batch_size, saved.order.grad_accum, saved.order.train_len), (Some(16), Some(1), Some(48)));
    Ok(())
}

#[test]
fn resume_without_a_checkpoint_or_from_a_damaged_one_is_an_error_naming_it() -> Result<()> {
    let data = blobs(32, 15)?;
    let dir = tempfile::tempdir()?;
    let cfg = TrainerConfig { batch_size: 8, output_dir: Some(dir.path().into()), ..Default::default() };
    let resume = TrainerConfig { resume: true, ..cfg.clone() };
    let err = train_err(resume.clone(), &data, None);
    assert!(err.contains("nothing to resume") && err.contains("no checkpoint"), "{err}");
    train(TrainerConfig { halt_at_step: Some(3), ..cfg }, 0.0, &data, None)?;
    let (step, last) = checkpoint::list(dir.path())?.pop().unwrap();
    assert_eq!(step, 3);
    let state_file = last.join(checkpoint::STATE_FILE);
    let state = std::fs::read(&state_file)?;
    // Half-written or leftover folders beside it, even of later steps, are never resumed from.
    let root = checkpoint::checkpoints_dir(dir.path());
    for leftover in [".step-00000009.tmp", "step-00000009.tmp", ".step-00000003.old", "step-9", "step-+0000009"] {
        std::fs::create_dir_all(root.join(leftover))?;
        std::fs::write(root.join(leftover).join(checkpoint::STATE_FILE), b"{")?;
    }
    assert_eq!(checkpoint::latest(dir.path())?, Some(last.clone()));
    std::fs::write(&state_file, b"{\"step\": ")?;
    let err = train_err(resume.clone(), &data, None);
    assert!(err.contains("trainer_state.json") && err.contains("not a trainer state") && err.contains("damaged"), "{err}");
    std::fs::remove_file(&state_file)?;
    let err = train_err(resume.clone(), &data, None);
    assert!(err.contains("trainer_state.json") && err.contains("cannot read"), "{err}");
    std::fs::write(&state_file, state)?;
    let (report, _) = train(resume, 0.0, &data, None)?;
    assert_eq!(report.resumed_from, Some(3));
    Ok(())
}

#[test]
fn a_nan_made_by_the_last_step_is_an_error_and_is_not_saved() -> Result<()> {
    let (data, eval) = (blobs(32, 16)?, blobs(16, 17)?);
    // 1e39 is a finite f64 but no f32: the one update sends the weights to ±inf and NaN, and
    // no later loss would see them.
    let last_step_blows_up = TrainerConfig { max_steps: Some(1), batch_size: 8, lr: 1e39, ..Default::default() };
    let err = train_err(last_step_blows_up.clone(), &data, None);
    assert!(err.contains("after step 1") && err.contains("weight") && err.contains("--lr"), "{err}");
    let dir = tempfile::tempdir()?;
    let err = train_err(TrainerConfig { output_dir: Some(dir.path().into()), ..last_step_blows_up.clone() }, &data, None);
    assert!(err.contains("after step 1") && err.contains("not saved"), "{err}");
    assert!(checkpoint::list(dir.path())?.is_empty(), "a NaN model was saved");
    // With an evaluation of that step, the NaN evaluation stops the run: never the best.
    let dir = tempfile::tempdir()?;
    let evaluated = TrainerConfig { output_dir: Some(dir.path().into()), eval_every: Some(1), goal: Some(MetricGoal::minimize("loss")), ..last_step_blows_up };
    let err = train_err(evaluated, &data, Some(&eval));
    assert!(err.contains("evaluation at step 1 gave loss NaN") && err.contains("--lr"), "{err}");
    assert!(checkpoint::list(dir.path())?.is_empty(), "a NaN model was saved");
    Ok(())
}

#[test]
fn a_loss_that_explodes_without_becoming_nan_stops_the_run() -> Result<()> {
    let data = blobs(64, 18)?;
    let err = train_err(TrainerConfig { epochs: 10, batch_size: 8, lr: 50.0, ..Default::default() }, &data, None);
    assert!(err.contains("diverged") && err.contains("smoothed") && err.contains("--lr"), "{err}");
    Ok(())
}

#[test]
fn early_stopping_that_could_never_fire_is_refused_before_training() -> Result<()> {
    let (data, eval) = (blobs(32, 19)?, blobs(16, 20)?);
    let dir = tempfile::tempdir()?;
    let stopping = TrainerConfig { early_stopping_patience: Some(2), goal: Some(MetricGoal::minimize("loss")), output_dir: Some(dir.path().into()), ..Default::default() };
    assert!(train_err(stopping.clone(), &data, None).contains("needs an evaluation set"));
    assert!(train_err(TrainerConfig { goal: None, ..stopping.clone() }, &data, Some(&eval)).contains("needs a goal metric"));
    // Four classes: no F1.
    let err = train_err(TrainerConfig { goal: Some(MetricGoal::maximize("f1")), ..stopping }, &data, Some(&eval));
    assert!(err.contains("\"f1\"") && err.contains("accuracy, loss"), "{err}");
    assert!(checkpoint::list(dir.path())?.is_empty() && !dir.path().join("metrics.jsonl").exists(), "work started");
    Ok(())
}

/// A model whose loss is finite and whose gradient is not: √w at w = 0.
struct SqrtAtZero(candle_core::Var);

impl wick::train::TrainModel for SqrtAtZero {
    type Batch = (Tensor, Tensor);
    fn task(&self) -> wick::train::Task {
        wick::train::Task::Regression
    }
    fn loss(&self, _: &Self::Batch, _train: bool) -> Result<Tensor> {
        Ok(self.0.as_tensor().sqrt()?.sum_all()?)
    }
    fn evaluate(&self, batch: &Self::Batch) -> Result<wick::train::EvalBatch> {
        wick::train::EvalBatch::from_mean_loss(&self.loss(batch, false)?, 1)
    }
}

#[test]
fn an_infinite_gradient_norm_stops_with_the_step() -> Result<()> {
    let data = blobs(16, 21)?;
    let var = candle_core::Var::zeros(3, DType::F32, &Device::Cpu)?;
    let params = vec![optim::Param { name: "w".into(), var: var.clone(), decay: true }];
    let config = TrainerConfig { batch_size: 8, max_grad_norm: Some(1.0), progress: false, ..Default::default() };
    let mut trainer = Trainer::new(config, VarMap::new(), OptimizerConfig::sgd().build(params)?, Device::Cpu);
    let err = trainer.fit(&SqrtAtZero(var.clone()), &data, None).err().expect("an infinite gradient must stop training").to_string();
    assert!(err.contains("gradient norm is inf at step 1") && err.contains("--lr"), "{err}");
    assert_eq!(var.to_vec1::<f32>()?, [0.0; 3], "no update with an infinite gradient");
    Ok(())
}

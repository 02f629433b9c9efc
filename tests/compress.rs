//! Distillation and pruning (src/compress, `wick distill`, `wick prune`) on the tiny fixture BERT
//! and GPT-2: masks that hold through AdamW steps and a resume, the distillation loss against a
//! hand computation and PyTorch, structured pruning that keeps the kept structure's outputs
//! exact, save/reload round trips, transformers' logits of the compressed folders
//! (tests/fixtures/make_compress_fixtures.py), and bad flags.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use clap::Parser;
use common::{assert_close, fixture_path, Fixture};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use wick::cmd::distill::{distill, DistillArgs};
use wick::cmd::prune::{prune, PruneArgs};
use wick::compress::distill::{kd_loss, DistillConfig, Distillation};
use wick::compress::prune::{self as pruning, Masks, Scope};
use wick::compress::{layers, Checkpoint, Compressible};
use wick::data::text::{read_text_file, LabelSet, Targets, TextColumns, TokenizedTexts};
use wick::data::Dataset;
use wick::models::bert::BertForSequenceClassification as Bert;
use wick::models::gpt2::GPT2LMHeadModel as Gpt2;
use wick::train::{optim, OptimizerConfig, TrainModel, Trainer, TrainerConfig};
use wick::weights::ModelFiles;

const TRAIN: &str = "sentence\tlabel\n\
the movie was great \tpositive\na dull , boring film \tnegative\nnot bad at all \tpositive\nthis is the worst film ever \tnegative\n\
i love this movie \tpositive\ni hate the plot \tnegative\nreally good fun \tpositive\nsad and too long \tnegative\n\
the film was an act \tneutral\nthe story is long \tneutral\n";

fn hf(name: &str) -> PathBuf {
    fixture_path(&format!("hf/{name}"))
}

fn read<M: Compressible>(name: &str) -> Result<(ModelFiles, Checkpoint<M>)> {
    let files = ModelFiles::from_dir(&hf(name))?;
    let ckpt = Checkpoint::<M>::read(&files, &Device::Cpu)?;
    Ok((files, ckpt))
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// The tiny classifier's training texts, with its labels.
fn tiny_texts(dir: &Path, files: &ModelFiles, cfg: &wick::models::bert::Config) -> Result<TokenizedTexts> {
    let file = read_text_file(&write(dir, "train.tsv", TRAIN), &TextColumns::default(), true)?;
    let targets = Targets::Classes(file.class_ids(&LabelSet { names: cfg.labels() })?);
    TokenizedTexts::new(&files.tokenizer()?, &file.examples, targets, 32, cfg.pad_token_id)
}

/// The fixture batch transformers' references were computed on.
fn bert_logits(model: &Bert) -> Result<Tensor> {
    let fx = Fixture::load("hf/bert-tiny-cls.reference")?;
    Ok(model.forward(&fx.get("input.input_ids")?, Some(&fx.get("input.attention_mask")?), Some(&fx.get("input.token_type_ids")?), false)?)
}

fn gpt2_logits(model: &Gpt2) -> Result<Tensor> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    Ok(model.forward(&fx.get("input.input_ids")?, Some(&fx.get("input.position_ids")?), Some(&fx.get("input.attention_mask")?), None, false)?)
}

fn var(varmap: &VarMap, name: &str) -> Tensor {
    varmap.data().lock().unwrap()[name].as_tensor().copy().unwrap()
}

/// Positions where `mask` is 0 hold exactly zero in `t`; returns how many positions that is.
fn zeros_held(t: &Tensor, mask: &Tensor) -> Result<usize> {
    let (t, mask) = (t.flatten_all()?.to_vec1::<f32>()?, mask.flatten_all()?.to_vec1::<f32>()?);
    let pruned: Vec<usize> = (0..t.len()).filter(|&i| mask[i] == 0.0).collect();
    let moved = pruned.iter().filter(|&&i| t[i] != 0.0).count();
    anyhow::ensure!(moved == 0, "{moved} of {} pruned weights are no longer zero", pruned.len());
    Ok(pruned.len())
}

fn trainer(varmap: &VarMap, out: &Path, resume: bool, masks: Option<Masks>) -> Result<Trainer> {
    let config = TrainerConfig {
        epochs: 3,
        batch_size: 4,
        lr: 1e-2,
        output_dir: Some(out.to_path_buf()),
        resume,
        halt_at_step: (!resume).then_some(4),
        progress: false,
        ..Default::default()
    };
    // Weight decay on every weight: it pulls a pruned weight's zero nowhere, but the moments of
    // AdamW move it off zero unless the mask is re-applied.
    let optimizer = OptimizerConfig::adamw(0.1).build(optim::params(varmap, optim::is_bias_or_norm))?;
    let mut trainer = Trainer::new(config, varmap.clone(), optimizer, Device::Cpu);
    trainer.after_update = masks.map(|m| Box::new(move |v: &VarMap| m.apply_to_varmap(v)) as wick::train::UpdateHook);
    Ok(trainer)
}

#[test]
fn pruned_weights_stay_zero_through_adamw_steps_and_a_resume() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (files, source) = read::<Bert>("bert-tiny-cls")?;
    let data = tiny_texts(dir.path(), &files, &source.config)?;
    let masks = Masks::magnitude(&source, 0.5, Scope::Global)?;
    assert!((masks.sparsity()? - 0.5).abs() < 1e-3, "{}", masks.sparsity()?);
    let mut pruned = source.clone();
    masks.apply_to_tensors(&mut pruned.tensors)?;
    let name = "bert.encoder.layer.1.intermediate.dense.weight";
    let mask = masks.masks.iter().find(|(n, _)| n == name).unwrap().1.clone();

    // Without the hook the optimizer moves the pruned weights: the check below can fail.
    let (model, varmap) = pruned.trainable(&Device::Cpu)?;
    trainer(&varmap, &dir.path().join("unmasked"), false, None)?.fit(&model, &data, None)?;
    assert!(zeros_held(&var(&varmap, name), &mask).is_err());

    // With it, through 4 steps, a halt, and a resume in a fresh process's worth of objects
    // whose masks are re-derived from the checkpoint's zeros.
    let out = dir.path().join("masked");
    let (model, varmap) = pruned.trainable(&Device::Cpu)?;
    let report = trainer(&varmap, &out, false, Some(masks.clone()))?.fit(&model, &data, None)?;
    assert!(report.halted && report.steps == 4);
    for (n, m) in &masks.masks {
        zeros_held(&var(&varmap, n), m)?;
    }
    let latest = wick::train::checkpoint::latest(&out)?.unwrap();
    let saved = wick::train::checkpoint::read_safetensors(&latest.join(wick::train::checkpoint::MODEL_FILE), &Device::Cpu)?;
    let rederived = Masks::from_zeros::<Bert>(&saved)?;
    assert!(rederived.sparsity()? >= masks.sparsity()?);
    let (model, varmap) = source.trainable(&Device::Cpu)?; // unpruned weights: the resume restores the pruned ones
    let before = var(&varmap, name);
    let report = trainer(&varmap, &out, true, Some(rederived))?.fit(&model, &data, None)?;
    assert_eq!((report.resumed_from, report.steps), (Some(4), 9));
    for (n, m) in &masks.masks {
        zeros_held(&var(&varmap, n), m)?;
    }
    // The unpruned weights did train.
    let after = var(&varmap, name);
    let changed = after.ne(&before.mul(&mask)?)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    assert!(changed > 100.0, "{changed}");
    Ok(())
}

#[test]
fn per_matrix_pruning_reaches_the_sparsity_in_every_matrix_and_skips_embeddings_norms_biases_head() -> Result<()> {
    let (_, source) = read::<Bert>("bert-tiny-cls")?;
    let masks = Masks::magnitude(&source, 0.3, Scope::PerMatrix)?;
    assert_eq!(masks.masks.len(), 12); // 6 linear layers × 2 layers; pooler and classifier excluded
    for (name, m) in &masks.masks {
        assert!(name.starts_with("bert.encoder.layer.") && name.ends_with(".weight"), "{name}");
        let kept = m.sum_all()?.to_scalar::<f32>()? as f64 / m.elem_count() as f64;
        assert!((kept - 0.7).abs() < 0.01, "{name}: kept {kept}");
    }
    let (_, gpt2) = read::<Gpt2>("gpt2-tiny")?;
    let names: Vec<String> = Masks::magnitude(&gpt2, 0.5, Scope::Global)?.masks.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 8);
    assert!(names.iter().all(|n| n.starts_with("transformer.h.") && !n.contains("ln_")), "{names:?}");
    Ok(())
}

/// Hinton's loss by hand, in f64: T² · mean over rows of Σ p_t (log p_t − log p_s).
fn kd_by_hand(s: &[Vec<f64>], t: &[Vec<f64>], temp: f64) -> f64 {
    let log_softmax = |z: &[f64]| -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = z.iter().map(|v| ((v - m) / temp).exp()).sum::<f64>().ln();
        z.iter().map(|v| (v - m) / temp - lse).collect()
    };
    let total: f64 = s
        .iter()
        .zip(t)
        .map(|(s, t)| {
            let (ls, lt) = (log_softmax(s), log_softmax(t));
            lt.iter().zip(&ls).map(|(lt, ls)| lt.exp() * (lt - ls)).sum::<f64>()
        })
        .sum();
    temp * temp * total / s.len() as f64
}

#[test]
fn distillation_loss_matches_a_hand_computation_and_pytorch() -> Result<()> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture_path("compress/kd_loss.json"))?)?;
    let rows = |key: &str| -> Vec<Vec<f64>> { serde_json::from_value(json[key].clone()).unwrap() };
    let (s, t) = (rows("student"), rows("teacher"));
    let tensor = |v: &[Vec<f64>]| Tensor::new(v.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>(), &Device::Cpu)?.reshape((v.len(), v[0].len()));
    let (st, tt) = (tensor(&s)?, tensor(&t)?);
    for case in json["cases"].as_array().unwrap() {
        let temp = case["temperature"].as_f64().unwrap();
        let torch = case["kd"].as_f64().unwrap();
        let ours = kd_loss(&st, &tt, temp)?.to_scalar::<f32>()? as f64;
        let hand = kd_by_hand(&s, &t, temp);
        assert!((hand - torch).abs() < 1e-9 * torch.abs().max(1.0), "T={temp}: hand {hand} vs torch {torch}");
        assert!((ours - torch).abs() < 1e-5 * torch.abs().max(1.0), "T={temp}: wick {ours} vs torch {torch}");
    }
    // The same logits: no divergence. A student that copies its teacher has zero loss.
    assert!(kd_loss(&tt, &tt, 2.0)?.to_scalar::<f32>()?.abs() < 1e-6);

    // The cosine term: 1 − cos averaged over real tokens (row 0 has two, row 1 one; the padded
    // token's vectors, opposite, must not count): (1 − 1) + (1 − 0) + (1 − cos 60°) over 3.
    let dev = Device::Cpu;
    let student = Tensor::new(&[[[1f32, 0.], [0., 1.]], [[1., 0.], [5., 5.]]], &dev)?;
    let teacher = Tensor::new(&[[[2f32, 0.], [1., 0.]], [[0.5, 0.75f32.sqrt()], [-5., -5.]]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1], [1, 0]], &dev)?;
    let cos = wick::compress::distill::cosine_loss(&wick::compress::distill::Hidden { states: student, mask }, &teacher)?.to_scalar::<f32>()?;
    assert!((cos - 1.5 / 3.0).abs() < 1e-6, "{cos}");
    Ok(())
}

#[test]
fn the_full_loss_and_its_cached_teacher_agree_with_the_formula() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (files, teacher_ckpt) = read::<Bert>("bert-tiny-cls")?;
    let data = tiny_texts(dir.path(), &files, &teacher_ckpt.config)?;
    let student_ckpt = layers::keep_layers(&teacher_ckpt, &layers::spread_evenly(2, 1)?)?;
    let batch = data.batch(&[0, 3, 8, 9], &Device::Cpu)?;
    let (alpha, temperature) = (0.3, 2.5);
    let new = |cache_teacher| -> Result<Distillation<Bert>> {
        Distillation::new(student_ckpt.model(&Device::Cpu)?, teacher_ckpt.model(&Device::Cpu)?, DistillConfig { alpha, temperature, cosine: 0.0, cache_teacher })
    };
    let plain = new(false)?.loss(&batch, false)?.to_scalar::<f32>()?;
    let s = student_ckpt.model(&Device::Cpu)?;
    let t = teacher_ckpt.model(&Device::Cpu)?;
    let fwd = |m: &Bert| m.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&batch.token_type_ids), false);
    let (sl, tl) = (fwd(&s)?, fwd(&t)?);
    let expected = alpha * kd_by_hand(&to_f64(&sl)?, &to_f64(&tl)?, temperature)
        + (1.0 - alpha) * wick::nn::cross_entropy(&sl, batch.labels.as_ref().unwrap())?.to_scalar::<f32>()? as f64;
    assert!((plain as f64 - expected).abs() < 1e-5, "{plain} vs {expected}");
    // α = 0: the labels' cross-entropy alone (and no teacher pass).
    let labels_only = Distillation::new(student_ckpt.model(&Device::Cpu)?, teacher_ckpt.model(&Device::Cpu)?, DistillConfig { alpha: 0.0, temperature, cosine: 0.0, cache_teacher: true })?;
    let ce = labels_only.loss(&batch, false)?.to_scalar::<f32>()?;
    assert_eq!((ce, labels_only.cached_rows()), (wick::nn::cross_entropy(&sl, batch.labels.as_ref().unwrap())?.to_scalar::<f32>()?, 0));
    let cached = new(true)?;
    // A batch in another order and padding: the rows' cached logits are found by their tokens.
    let first = cached.loss(&data.batch(&[9, 8, 3, 0], &Device::Cpu)?, false)?.to_scalar::<f32>()?;
    assert_eq!(cached.cached_rows(), 4);
    let again = cached.loss(&batch, false)?.to_scalar::<f32>()?;
    assert!((again - plain).abs() < 1e-5 && (first - plain).abs() < 1e-5, "{first} {again} {plain}");
    Ok(())
}

fn to_f64(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// Zeroes the down-projection of every odd FFN neuron in every layer; returns the even ones.
fn silence_odd_neurons<M: Compressible>(ckpt: &mut Checkpoint<M>) -> Result<Vec<u32>> {
    let size = M::ffn_size(&ckpt.config);
    let keep: Vec<f32> = (0..size).map(|j| if j % 2 == 0 { 1.0 } else { 0.0 }).collect();
    for layer in 0..M::num_layers(&ckpt.config) {
        let name = Checkpoint::<M>::layer_tensor_name(layer, M::FFN_DOWN.name);
        let t = &ckpt.tensors[&name];
        let mut shape = vec![1, 1];
        shape[M::FFN_DOWN.dim] = size;
        let mask = Tensor::new(keep.as_slice(), &Device::Cpu)?.reshape(shape)?;
        let zeroed = t.broadcast_mul(&mask)?;
        ckpt.tensors.insert(name, zeroed);
    }
    Ok((0..size as u32).filter(|j| j % 2 == 0).collect())
}

#[test]
fn dropping_ffn_neurons_whose_output_weights_are_zero_changes_no_logit() -> Result<()> {
    // BERT (down-projection stored (out, in)) and GPT-2 (Conv1D, stored (in, out)).
    let (_, mut bert) = read::<Bert>("bert-tiny-cls")?;
    let even = silence_odd_neurons(&mut bert)?;
    let scores = pruning::ffn_norm_scores(&bert)?;
    assert!(scores.iter().all(|s| s.iter().enumerate().all(|(j, v)| (j % 2 == 1) == (*v == 0.0))));
    let smaller = pruning::keep_ffn_neurons(&bert, even.len(), &scores)?;
    assert_eq!(smaller.config.intermediate_size, 19);
    assert_close("BERT logits without the silent neurons", &bert_logits(&smaller.model(&Device::Cpu)?)?, &bert_logits(&bert.model(&Device::Cpu)?)?, 1e-5)?;
    let up = &smaller.tensors["bert.encoder.layer.0.intermediate.dense.weight"];
    assert_eq!(up.dims(), [19, 32]);
    assert_close("kept rows", up, &bert.tensors["bert.encoder.layer.0.intermediate.dense.weight"].index_select(&Tensor::new(even.as_slice(), &Device::Cpu)?, 0)?, 0.0)?;

    // Michel et al.'s score of a silent neuron is zero too (its gate gradient is Σ W·∂L/∂W = 0).
    let dir = tempfile::tempdir()?;
    let files = ModelFiles::from_dir(&hf("bert-tiny-cls"))?;
    let data = tiny_texts(dir.path(), &files, &bert.config)?;
    let (model, varmap) = bert.trainable(&Device::Cpu)?;
    let grads = pruning::ffn_gradient_scores(&model, &varmap, 2, &[data.batch(&[0, 1, 2, 3], &Device::Cpu)?])?;
    assert!(grads.iter().all(|s| s.iter().enumerate().all(|(j, v)| (j % 2 == 1) == (*v == 0.0))), "{grads:?}");

    let (_, mut gpt2) = read::<Gpt2>("gpt2-tiny")?;
    let even = silence_odd_neurons(&mut gpt2)?;
    let smaller = pruning::keep_ffn_neurons(&gpt2, even.len(), &pruning::ffn_norm_scores(&gpt2)?)?;
    assert_eq!(smaller.config.n_inner, Some(64));
    assert_eq!(smaller.tensors["transformer.h.1.mlp.c_fc.weight"].dims(), [32, 64]);
    assert_close("GPT-2 logits without the silent neurons", &gpt2_logits(&smaller.model(&Device::Cpu)?)?, &gpt2_logits(&gpt2.model(&Device::Cpu)?)?, 1e-5)
}

#[test]
fn keeping_layers_renumbers_them_and_keeps_their_outputs() -> Result<()> {
    let (_, bert) = read::<Bert>("bert-tiny-cls")?;
    let one = layers::keep_layers(&bert, &[1])?;
    assert_eq!(one.config.num_hidden_layers, 1);
    assert_close("layer 1 became layer 0", &one.tensors["bert.encoder.layer.0.output.dense.weight"], &bert.tensors["bert.encoder.layer.1.output.dense.weight"], 0.0)?;
    assert!(!one.tensors.keys().any(|k| k.starts_with("bert.encoder.layer.1.")));
    assert_eq!(one.tensors.len(), bert.tensors.len() - 16);
    assert!(layers::keep_layers(&bert, &[1, 0]).is_err() && layers::keep_layers(&bert, &[2]).is_err());
    Ok(())
}

#[derive(Parser)]
struct Prune {
    #[command(flatten)]
    args: PruneArgs,
}

#[derive(Parser)]
struct Distill {
    #[command(flatten)]
    args: DistillArgs,
}

fn prune_args(argv: &[&str]) -> Result<PruneArgs, clap::Error> {
    Prune::try_parse_from(std::iter::once("prune").chain(argv.iter().copied())).map(|c| c.args)
}

fn distill_args(argv: &[&str]) -> Result<DistillArgs, clap::Error> {
    Distill::try_parse_from(std::iter::once("distill").chain(argv.iter().copied())).map(|c| c.args)
}

/// The folders `wick prune` writes for tests/fixtures/hf/compress (no recovery: deterministic).
const PRUNED_FIXTURES: &[(&str, &str, &[&str])] = &[
    ("bert-sparse-50", "bert-tiny-cls", &["--sparsity", "0.5"]),
    ("bert-ffn-half", "bert-tiny-cls", &["--ffn-keep", "0.5"]),
    ("bert-drop-1", "bert-tiny-cls", &["--drop-layers", "1"]),
    ("gpt2-sparse-30-per-layer", "gpt2-tiny", &["--sparsity", "0.3", "--per-layer"]),
    ("gpt2-ffn-half", "gpt2-tiny", &["--ffn-keep", "0.5"]),
];

fn tensors_of(dir: &Path) -> Result<HashMap<String, Tensor>> {
    ModelFiles::from_dir(dir)?.load_tensors(&Device::Cpu)
}

#[test]
fn committed_pruned_folders_are_what_wick_prune_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, source, flags) in PRUNED_FIXTURES {
        let out = dir.path().join(name);
        let (model, out_s) = (hf(source), out.to_str().unwrap().to_string());
        let argv: Vec<&str> = ["--model", model.to_str().unwrap(), "--output", &out_s, "--json"].into_iter().chain(flags.iter().copied()).collect();
        prune(&prune_args(&argv)?)?;
        let (ours, committed) = (tensors_of(&out)?, tensors_of(&hf(&format!("compress/{name}")))?);
        assert_eq!(ours.len(), committed.len(), "{name}");
        for (k, v) in &ours {
            assert_close(&format!("{name} {k}"), v, &committed[k], 0.0)?;
        }
    }
    Ok(())
}

#[test]
fn transformers_gives_the_logits_wick_gives_on_the_compressed_folders() -> Result<()> {
    let mut names: Vec<&str> = PRUNED_FIXTURES.iter().map(|(n, _, _)| *n).collect();
    names.extend(["bert-distilled-1", "gpt2-distilled-1"]);
    for name in names {
        let files = ModelFiles::from_dir(&hf(&format!("compress/{name}")))?;
        let fx = Fixture::load(&format!("hf/compress/{name}.reference"))?;
        let ours = if name.starts_with("bert") {
            bert_logits(&wick::pretrained::load::<Bert>(&files, DType::F32, &Device::Cpu)?.0)?
        } else {
            let logits = gpt2_logits(&wick::pretrained::load::<Gpt2>(&files, DType::F32, &Device::Cpu)?.0)?;
            // Left padding: transformers' logits at padded positions are meaningless; compare real tokens.
            logits.broadcast_mul(&fx.get("input.attention_mask")?.to_dtype(DType::F32)?.unsqueeze(2)?)?
        };
        assert_close(&format!("{name} logits"), &ours, &fx.get("output.logits")?, 1e-4)?;
    }
    Ok(())
}

#[test]
fn prune_and_distill_save_folders_that_reload_with_the_same_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "train.tsv", TRAIN);
    let (data, model) = (data.to_str().unwrap(), hf("bert-tiny-cls"));
    let model = model.to_str().unwrap();
    // Recovery fine-tuning with the masks held, then saved: the zeros are in the file.
    let out = dir.path().join("pruned");
    let argv = ["--model", model, "--sparsity", "0.5", "--data", data, "--eval", data, "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--output", out.to_str().unwrap(), "--json"];
    let summary = prune(&prune_args(&argv)?)?;
    assert_eq!(summary["recovery_steps"], 6);
    let reloaded = wick::pretrained::load::<Bert>(&ModelFiles::from_dir(&out)?, DType::F32, &Device::Cpu)?.0;
    let ckpt = Checkpoint::<Bert>::read(&ModelFiles::from_dir(&out)?, &Device::Cpu)?;
    assert!(pruning::measured_sparsity::<Bert>(&ckpt.tensors)? >= 0.5);
    assert_close("pruned, reloaded", &bert_logits(&reloaded)?, &bert_logits(&ckpt.trainable(&Device::Cpu)?.0)?, 0.0)?;

    // A distilled student: the weights training left in the VarMap give the saved folder's logits.
    let (files, teacher) = read::<Bert>("bert-tiny-cls")?;
    let texts = tiny_texts(dir.path(), &files, &teacher.config)?;
    let student = layers::keep_layers(&teacher, &[0])?;
    let (student_model, varmap) = student.trainable(&Device::Cpu)?;
    let distillation = Distillation::new(student_model, teacher.model(&Device::Cpu)?, DistillConfig { alpha: 0.5, temperature: 2.0, cosine: 1.0, cache_teacher: false })?;
    let config = TrainerConfig { epochs: 2, batch_size: 4, lr: 1e-2, progress: false, ..Default::default() };
    let optimizer = OptimizerConfig::adamw(0.01).build(optim::params(&varmap, optim::is_bias_or_norm))?;
    let report = Trainer::new(config, varmap.clone(), optimizer, Device::Cpu).fit(&distillation, &texts, None)?;
    assert!(report.train_losses.last().unwrap().1 < report.train_losses[0].1, "{:?}", report.train_losses);
    let trained = Checkpoint::<Bert> { config: student.config.clone(), tensors: wick::train::checkpoint::varmap_tensors(&varmap)? };
    let out = dir.path().join("student");
    trained.save(&out, Some(&files.dir))?;
    let reloaded = wick::pretrained::load::<Bert>(&ModelFiles::from_dir(&out)?, DType::F32, &Device::Cpu)?.0;
    assert_close("distilled, reloaded", &bert_logits(&reloaded)?, &bert_logits(&distillation.student)?, 0.0)?;
    assert!(out.join("tokenizer.json").is_file());
    Ok(())
}

#[test]
fn a_sparsity_sweep_writes_a_folder_per_sparsity_a_table_and_a_picture() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "train.tsv", TRAIN);
    let (data, model, out) = (data.to_str().unwrap(), hf("bert-tiny-cls"), dir.path().join("sweep"));
    let argv = ["--model", model.to_str().unwrap(), "--sparsity", "0,0.5,0.9", "--data", data, "--eval", data, "--batch-size", "4", "--lr", "1e-3", "--output", out.to_str().unwrap(), "--json"];
    let summary = prune(&prune_args(&argv)?)?;
    assert_eq!(summary["metric"], "accuracy");
    let runs = summary["sweep"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let mut last_sparsity = -1.0;
    for (run, wanted) in runs.iter().zip([0.0, 0.5, 0.9]) {
        assert_eq!(run["sparsity"], wanted);
        assert!(run["eval_accuracy"].is_f64() && run["eval_before_accuracy"].is_f64(), "{run}");
        let folder = out.join(format!("sparsity-{wanted}"));
        let measured = pruning::measured_sparsity::<Bert>(&Checkpoint::<Bert>::read(&ModelFiles::from_dir(&folder)?, &Device::Cpu)?.tensors)?;
        assert!(measured > wanted - 1e-3 && measured > last_sparsity, "{wanted}: {measured}");
        last_sparsity = measured;
    }
    let table: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json"))?)?;
    let column = |v: &serde_json::Value, key: &str| v["sweep"].as_array().unwrap().iter().map(|r| r[key].clone()).collect::<Vec<_>>();
    assert_eq!(column(&table, "sparsity"), column(&summary, "sparsity"));
    assert_eq!(column(&table, "eval_accuracy"), column(&summary, "eval_accuracy"));
    let picture = std::fs::read_to_string(out.join("sweep.svg"))?;
    assert!(picture.contains("<svg") && picture.contains("accuracy after recovery"), "{}", &picture[..200.min(picture.len())]);
    Ok(())
}

#[test]
fn wick_distill_trains_bert_and_gpt2_students() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "train.tsv", TRAIN);
    let out = dir.path().join("bert");
    let teacher = hf("bert-tiny-cls");
    let argv = ["--teacher", teacher.to_str().unwrap(), "--student-layers", "1", "--data", data.to_str().unwrap(), "--eval", data.to_str().unwrap(), "--epochs", "2", "--batch-size", "4", "--cache-teacher", "--output", out.to_str().unwrap(), "--json"];
    let summary = distill(&distill_args(&argv)?)?;
    assert_eq!((summary["steps"].as_u64(), summary["cached_teacher_rows"].as_u64()), (Some(6), Some(10)));
    assert!(summary["teacher_eval_accuracy"].is_number() && summary["eval_accuracy"].is_number());
    let (_, cfg) = wick::pretrained::load::<Bert>(&ModelFiles::from_dir(&out)?, DType::F32, &Device::Cpu)?;
    assert_eq!((cfg.num_hidden_layers, cfg.labels()), (1, vec!["negative".to_string(), "neutral".into(), "positive".into()]));

    // A fresh, narrower student from a config: the cosine loss cannot compare widths.
    let small = r#"{"vocab_size": 114, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20, "max_position_embeddings": 40}"#;
    let cfg_path = write(dir.path(), "small.json", small);
    let fresh = |out: &str, extra: &[&str]| -> Result<serde_json::Value> {
        let out = dir.path().join(out);
        let argv = ["--teacher", teacher.to_str().unwrap(), "--student-config", cfg_path.to_str().unwrap(), "--data", data.to_str().unwrap(), "--max-steps", "2", "--batch-size", "4", "--output", out.to_str().unwrap(), "--json"];
        distill(&distill_args(&argv.iter().chain(extra).copied().collect::<Vec<_>>())?)
    };
    fresh("fresh", &[])?;
    let (_, cfg) = wick::pretrained::load::<Bert>(&ModelFiles::from_dir(&dir.path().join("fresh"))?, DType::F32, &Device::Cpu)?;
    assert_eq!((cfg.hidden_size, cfg.num_labels()), (16, 3));
    let err = fresh("cosine", &["--cosine", "1"]).unwrap_err();
    assert!(format!("{err:#}").contains("one width"), "{err:#}");

    // GPT-2: a one-layer student of the two-layer teacher on a text file.
    let words = ["the", "king", "said", "to", "queen", "that", "all", "is", "well", "and", "good", "in", "land", "."];
    let text: Vec<&str> = (0..1500).map(|i| words[(i * 7 + i / 3) % words.len()]).collect();
    let corpus = write(dir.path(), "corpus.txt", &text.join(" "));
    let teacher = hf("gpt2-tiny");
    let gpt2 = |out: &str, extra: &[&str]| -> Result<serde_json::Value> {
        let out = dir.path().join(out);
        let argv = ["--teacher", teacher.to_str().unwrap(), "--student-layers", "1", "--data", corpus.to_str().unwrap(), "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--output", out.to_str().unwrap(), "--json"];
        distill(&distill_args(&argv.iter().chain(extra).copied().collect::<Vec<_>>())?)
    };
    let summary = gpt2("gpt2", &[])?;
    assert!(summary["eval_perplexity"].as_f64().unwrap().is_finite() && summary["teacher_eval_perplexity"].is_number());
    let (_, cfg) = wick::pretrained::load::<Gpt2>(&ModelFiles::from_dir(&dir.path().join("gpt2"))?, DType::F32, &Device::Cpu)?;
    assert_eq!(cfg.n_layer, 1);
    assert!(format!("{:#}", gpt2("cached", &["--cache-teacher"]).unwrap_err()).contains("classifiers"));
    Ok(())
}

#[test]
fn bad_flags_are_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (model, out) = (hf("bert-tiny-cls"), dir.path().join("o"));
    let (model, out) = (model.to_str().unwrap(), out.to_str().unwrap());
    let err = |argv: &[&str]| -> String {
        match prune_args(argv) {
            Err(e) => e.to_string(),
            Ok(args) => format!("{:#}", prune(&args).unwrap_err()),
        }
    };
    assert!(err(&["--model", model, "--output", out, "--sparsity", "1.5"]).contains("--sparsity 1.5: must be at least 0 and below 1"));
    assert!(err(&["--model", model, "--output", out, "--sparsity", "1"]).contains("below 1"));
    assert!(err(&["--model", model, "--output", out, "--ffn-keep", "0"]).contains("greater than 0"));
    assert!(err(&["--model", model, "--output", out, "--drop-layers", "2"]).contains("layer 2 does not exist: the model has 2 layers"));
    assert!(err(&["--model", model, "--output", out, "--drop-layers", "0,1"]).contains("leaves no model"));
    assert!(err(&["--model", model, "--output", out]).contains("required"));
    assert!(err(&["--model", model, "--output", out, "--sparsity", "0.5", "--ffn-keep", "0.5"]).contains("cannot be used with"));
    assert!(err(&["--model", model, "--output", out, "--ffn-keep", "0.5", "--importance", "gradient"]).contains("needs --data"));
    let teacher = ["--teacher", model, "--data", "x.tsv", "--output", out];
    let err = |extra: &[&str]| -> String {
        let argv: Vec<&str> = teacher.iter().chain(extra).copied().collect();
        match distill_args(&argv) {
            Err(e) => e.to_string(),
            Ok(args) => format!("{:#}", distill(&args).unwrap_err()),
        }
    };
    assert!(err(&["--student-layers", "3"]).contains("3 layers asked for, but the teacher has only 2"));
    assert!(err(&["--student-layers", "0"]).contains("at least 1"));
    assert!(err(&[]).contains("required"));
    assert!(err(&["--student-layers", "1", "--alpha", "1.5"]).contains("between 0 and 1"));
    assert!(err(&["--student-layers", "1", "--cosine", "1", "--cache-teacher"]).contains("one or the other"));
    Ok(())
}

//! One way to load and save every model (`wick::pretrained`), and the model folder's guards:
//! config/weight mismatches, shard paths outside the folder, revisions that are paths.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::fixture_path;
use wick::hub::{self, HubOptions};
use wick::models::bert::{self, BertForSequenceClassification, BertModel};
use wick::models::gpt2::GPT2LMHeadModel;
use wick::models::mlp::{Mlp, MlpConfig};
use wick::pretrained::{self, Pretrained};
use wick::weights::ModelFiles;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[test]
fn a_config_with_fewer_layers_than_the_weights_is_an_error_not_dropped_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    copy_dir(&fixture_path("hf/gpt2-tiny"), dir.path())?;
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["n_layer"] = 1.into();
    std::fs::write(&path, config.to_string())?;
    let files = ModelFiles::from_dir(dir.path())?;
    let err = format!("{:#}", pretrained::load::<GPT2LMHeadModel>(&files, DType::F32, &Device::Cpu).err().unwrap());
    assert!(err.contains("do not belong together") && err.contains("h.1."), "{err}");
    // The base model of a classifier checkpoint skips the head without complaint.
    let cls = ModelFiles::from_dir(&fixture_path("hf/bert-tiny-cls"))?;
    pretrained::load::<BertModel>(&cls, DType::F32, &Device::Cpu)?;
    Ok(())
}

#[test]
fn save_then_load_gives_the_same_model_and_a_config_transformers_reads() -> Result<()> {
    let device = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let config = MlpConfig::new(6, &[5], 3);
    let mlp = Mlp::build(wick::nn::var_builder(&varmap, DType::F32, &device, 7), &config)?;
    let dir = tempfile::tempdir()?;
    pretrained::save_varmap::<Mlp>(dir.path(), &config, &varmap, None)?;
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(saved["model_type"], "wick-mlp");
    assert_eq!(saved["architectures"][0], "Mlp");
    let files = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?;
    let (reloaded, reloaded_config) = pretrained::load::<Mlp>(&files, DType::F32, &device)?;
    assert_eq!(reloaded_config, config);
    let x = Tensor::randn(0f32, 1.0, (4, 6), &device)?;
    use candle_nn::ModuleT;
    let (a, b) = (mlp.forward_t(&x, false)?, reloaded.forward_t(&x, false)?);
    // The trainable and the fixed model may take different product kernels: float noise only.
    common::assert_close("reloaded MLP", &b, &a, 1e-6)?;
    // Another family's folder is refused by its model_type.
    let err = pretrained::load::<GPT2LMHeadModel>(&files, DType::F32, &device).err().unwrap().to_string();
    assert!(err.contains("wick-mlp") && err.contains("gpt2"), "{err}");
    Ok(())
}

#[test]
fn load_trainable_starts_a_new_head_for_new_labels_and_keeps_the_encoder() -> Result<()> {
    let device = Device::Cpu;
    let files = ModelFiles::from_dir(&fixture_path("hf/bert-tiny-cls"))?;
    let mut config: bert::Config = files.config()?;
    config.set_labels(&["a".into(), "b".into()]);
    let trainable = pretrained::load_trainable::<BertForSequenceClassification>(&files, &config, &device, 1, |name| !name.starts_with("classifier."))?;
    assert_eq!(trainable.report.newly_initialized, ["classifier.bias", "classifier.weight"]);
    let encoder = trainable.varmap.data().lock().unwrap()["bert.embeddings.word_embeddings.weight"].as_tensor().clone();
    let checkpoint = BertForSequenceClassification::canonical_names(files.load_tensors(&device)?, &config);
    assert_eq!(encoder.to_vec2::<f32>()?, checkpoint["bert.embeddings.word_embeddings.weight"].to_vec2::<f32>()?);
    // Without leaving the old head out, its shape no longer fits: an error naming it.
    let err = format!("{:#}", pretrained::load_trainable::<BertForSequenceClassification>(&files, &config, &device, 1, |_| true).err().unwrap());
    assert!(err.contains("classifier.") && err.contains("shape"), "{err}");
    Ok(())
}

#[test]
fn shard_names_and_revisions_never_lead_outside_the_model_folder() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    copy_dir(&fixture_path("hf/bert-tiny-base"), &model)?;
    std::fs::remove_file(model.join("model.safetensors"))?;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::copy(fixture_path("hf/bert-tiny-base/model.safetensors"), outside.join("x.safetensors"))?;
    for shard in ["../outside/x.safetensors", "/etc/passwd", "../../../../etc/passwd", ""] {
        let index = serde_json::json!({ "weight_map": { "embeddings.word_embeddings.weight": shard } });
        std::fs::write(model.join("model.safetensors.index.json"), index.to_string())?;
        let err = format!("{:#}", hub::resolve(model.to_str().unwrap(), &HubOptions::default()).err().unwrap());
        assert!(err.contains("not a file inside the model folder"), "{shard}: {err}");
    }
    let offline = HubOptions { offline: Some(true), cache_dir: Some(dir.path().join("cache")), ..Default::default() };
    for revision in ["/any/folder", "../x", "a/../../b"] {
        let err = format!("{:#}", hub::resolve("org/name", &offline.clone().revision(Some(revision.into()))).err().unwrap());
        assert!(err.contains("not a branch, tag or commit"), "{revision}: {err}");
    }
    // A config.json that is a folder is named as such.
    let odd = dir.path().join("odd");
    std::fs::create_dir_all(odd.join("config.json"))?;
    let err = format!("{:#}", hub::resolve(odd.to_str().unwrap(), &HubOptions::default()).err().unwrap());
    assert!(err.contains("is not a file"), "{err}");
    Ok(())
}

#[test]
fn non_finite_weights_and_links_out_of_the_folder_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    copy_dir(&fixture_path("hf/gpt2-tiny"), &model)?;
    let weights = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let name = "h.1.mlp.c_fc.weight";
    let key = tensors.keys().find(|k| k.ends_with(name)).unwrap().clone();
    let poisoned = tensors[&key].flatten_all()?.to_vec1::<f32>()?.into_iter().enumerate().map(|(i, v)| if i == 5 { f32::NAN } else { v }).collect::<Vec<_>>();
    tensors.insert(key.clone(), Tensor::from_vec(poisoned, tensors[&key].shape(), &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, &weights)?;
    let files = ModelFiles::from_dir(&model)?;
    let err = format!("{:#}", pretrained::load::<GPT2LMHeadModel>(&files, DType::F32, &Device::Cpu).err().unwrap());
    assert!(err.contains(name) && err.contains("NaN"), "{err}");

    // A weights file that is a link to a file outside the folder.
    std::fs::remove_file(&weights)?;
    let outside = dir.path().join("elsewhere.safetensors");
    std::fs::copy(fixture_path("hf/gpt2-tiny/model.safetensors"), &outside)?;
    std::os::unix::fs::symlink(&outside, &weights)?;
    let err = format!("{:#}", ModelFiles::from_dir(&model).err().unwrap());
    assert!(err.contains("outside the model folder"), "{err}");
    // The same for a tokenizer file.
    std::fs::remove_file(&weights)?;
    std::fs::copy(&outside, &weights)?;
    std::fs::remove_file(model.join("vocab.json"))?;
    std::os::unix::fs::symlink("/etc/passwd", model.join("vocab.json"))?;
    let err = format!("{:#}", ModelFiles::from_dir(&model)?.tokenizer().err().unwrap());
    assert!(err.contains("outside the model folder"), "{err}");
    Ok(())
}

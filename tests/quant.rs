//! Quantized inference (`wick::quant`, `wick quantize`): the rounding of each format against
//! candle's own bound, the quantized products (both kinds of activation quantization) against
//! f32 products, quantized GPT-2 and BERT against their f32 models, the GGUF folder round trip,
//! the shape rule, and the `wick` binary on a quantized folder.
//!
//! Errors are relative RMS errors, ‖q − f‖ / ‖f‖. One product with N(0, σ²) weights rounds its
//! weights (q8_0: a step of max|w|/127 per block of 32, 0.5% of the output; q6_k 1.8%; q4_k
//! 7.3%; q4_0, a step of max|w|/8, 8.5%) and its activations (Q8_0 or Q8K, 0.55-0.75%); the
//! two add in quadrature, measured 0.8%, 1.9%, 7.3% and 8.5%. [`product_bound`] is 1.4× that.
//! The logits of a two-layer model come from about nine products in series (GPT-2: four a
//! block and the LM head), whose errors add up and are amplified by the layers: measured 2-4×
//! one product's error on the models below, so [`model_bound`] is 5× one product's error.
//! Products of more than 32 rows of a q8_0 / q4_0 weight take 7-bit activations on AVX2
//! ([`seven_bit_activations`]): their activations' share doubles, and so does its bound.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use common::fixture_path;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use wick::models::bert::{self, BertForSequenceClassification, BertModel};
use wick::models::gpt2::{self, GPT2LMHeadModel};
use wick::ops::linear::{Dense, WeightLayout};
use wick::pretrained::{self, Pretrained};
use wick::quant::{folder::quantize_folder, gguf, quantize_model, quantize_weight, QuantType};
use wick::weights::ModelFiles;

/// N(0, 1) values from a fixed seed (candle's CPU generator cannot be seeded): the errors below
/// are then the same on every run, not a fresh draw that lands past a bound now and then.
fn seeded_normal(shape: (usize, usize), seed: u64) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

fn relative_error(a: &Tensor, reference: &Tensor) -> Result<f32> {
    let diff = (a - reference)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(diff / reference.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
}

/// A bound on one product's relative error against the f32 product.
fn product_bound(qtype: QuantType) -> f32 {
    1.4 * match qtype {
        QuantType::Q8_0 => 0.008,
        QuantType::Q6K => 0.019,
        QuantType::Q4K => 0.073,
        QuantType::Q4_0 => 0.085,
    }
}

/// Whether a product of `rows` rows, `outputs` outputs and `inputs` inputs rounds its
/// activations to 7 bits per block instead of 8 (the rule is the library's: see
/// `QuantType::activation_format`): twice the activations' rounding, measured 1.08% alone.
fn seven_bit_activations(qtype: QuantType, rows: usize, outputs: usize, inputs: usize) -> bool {
    qtype.activation_format(rows, outputs, inputs) == "7-bit blocks of 32"
}

/// A bound on a two-layer model's logits' relative error against the f32 model's.
fn model_bound(qtype: QuantType) -> f32 {
    5.0 * product_bound(qtype) / 1.4
}

/// llama.cpp's test vector and error measure (sqrt of the summed squared error over the element
/// count), as candle's `quantized_tests.rs` uses them, with candle's bound of 0.002 for every
/// 4-bit-and-up format: through wick's `quantize_weight`, in both weight layouts.
#[test]
fn quantize_dequantize_error_is_within_candles_bound() -> Result<()> {
    let n = 32 * 128;
    let values: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    let out_in = Tensor::from_vec(values.clone(), (16, 256), &Device::Cpu)?;
    for qtype in QuantType::ALL {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let weight = if layout == WeightLayout::OutIn { out_in.clone() } else { out_in.t()?.contiguous()? };
            let q = quantize_weight(&Dense::new(weight, None, layout), qtype)?;
            assert_eq!(q.shape().dims(), [16, 256]);
            let back = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let error = values.iter().zip(&back).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt() / n as f32;
            assert!(error < 0.002, "{qtype} {layout:?}: error {error}");
        }
    }
    Ok(())
}

/// A quantized layer against the f32 product with its dequantized weights (what is left is the
/// activations' rounding: Q8_0 for q8_0/q4_0, Q8K for the k-quants) and against the f32 layer,
/// one row (decoding) and many (a prompt), with bias and ReLU.
#[test]
fn quantized_products_match_f32_products_for_both_activation_formats() -> Result<()> {
    let dev = Device::Cpu;
    // 72 outputs, and 64: a multiple of 16, which more than 32 rows take through the 7-bit
    // integer product on AVX2 (`ops::matvec::qgemm`).
    for (qtype, outputs) in QuantType::ALL.into_iter().flat_map(|q| [(q, 72), (q, 64)]) {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let shape = if layout == WeightLayout::OutIn { (outputs, 512) } else { (512, outputs) };
            let mut dense = Dense::new(seeded_normal(shape, 1)?, Some(Tensor::zeros(outputs, DType::F32, &dev)?), layout);
            let f32_layer = dense.clone();
            let q = std::sync::Arc::new(quantize_weight(&dense, qtype)?);
            let dequantized = Dense::new(q.dequantize(&dev)?, dense.bias.clone(), WeightLayout::OutIn);
            dense.set_quantized(q)?;
            assert_eq!(dense.weight.dims(), [shape.0, shape.1]);
            for rows in [1, 7, 40] {
                let x = seeded_normal((rows, 512), 2 + rows as u64)?;
                // The activations' rounding alone: 0.55-0.75% in 8 bits, twice that in 7; added
                // in quadrature to the weights' for the bound against f32.
                let (activations, against_f32) = if seven_bit_activations(qtype, rows, outputs, 512) {
                    (0.02, (product_bound(qtype).powi(2) + (1.4f32 * 0.011).powi(2)).sqrt())
                } else {
                    (0.01, product_bound(qtype))
                };
                let error = relative_error(&dense.forward(&x)?, &dequantized.forward(&x)?)?;
                assert!(error < activations, "{qtype} ({} activations) {layout:?} {outputs} outputs, rows {rows}: {error}", qtype.activation_format(rows, outputs, 512));
                let error = relative_error(&dense.forward(&x)?, &f32_layer.forward(&x)?)?;
                assert!(error < against_f32, "{qtype} against f32 {layout:?} {outputs} outputs, rows {rows}: {error}");
                let error = relative_error(&dense.forward_relu(&x)?, &dequantized.forward(&x)?.relu()?)?;
                assert!(error < activations, "{qtype} relu rows {rows}: {error}");
            }
        }
    }
    Ok(())
}

fn gpt2_logits(model: &GPT2LMHeadModel, ids: &[u32]) -> Result<Tensor> {
    let ids = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    Ok(model.forward(&ids, None, None, None, false)?)
}

fn load<M: Pretrained>(dir: &Path) -> Result<M> {
    Ok(pretrained::load::<M>(&ModelFiles::from_dir(dir)?, DType::F32, &Device::Cpu)?.0)
}

/// A random model of `M`'s family saved as a Hugging Face folder (tokenizer files from
/// `tokenizer_from`).
fn random_folder<M: Pretrained>(dir: &Path, config: &M::Config, tokenizer_from: &Path) -> Result<()> {
    let varmap = VarMap::new();
    M::build(wick::nn::var_builder(&varmap, DType::F32, &Device::Cpu, 7), config)?;
    pretrained::save_varmap::<M>(dir, config, &varmap, Some(tokenizer_from))
}

/// GPT-2 and BERT, f32 against quantized folders written by `quantize_folder`: 32-block types
/// on the fixtures and on a tiny BERT of width 64, k-quants on a GPT-2 of width 256.
#[test]
fn quantized_gpt2_and_bert_stay_close_to_f32() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 350).collect();
    let mut failures = vec![];
    let tiny = fixture_path("hf/gpt2-tiny");
    let wide = tmp.path().join("gpt2-256");
    random_folder::<GPT2LMHeadModel>(&wide, &gpt2::Config::new(350, 64, 256, 2, 4), &tiny)?;
    for (source, types) in [(tiny.clone(), [QuantType::Q8_0, QuantType::Q4_0]), (wide.clone(), [QuantType::Q4K, QuantType::Q6K])] {
        let reference = gpt2_logits(&load::<GPT2LMHeadModel>(&source)?, &ids)?;
        for qtype in types {
            let out = tmp.path().join(format!("gpt2-{qtype}-{}", source.file_name().unwrap().to_string_lossy()));
            let report = quantize_folder(&ModelFiles::from_dir(&source)?, qtype, &out)?;
            assert_eq!(report.layers, 2 * 4 + 1, "every block's four products and the LM head");
            let error = relative_error(&gpt2_logits(&load::<GPT2LMHeadModel>(&out)?, &ids)?, &reference)?;
            eprintln!("gpt2 {qtype}: relative logit error {error:.4}");
            failures.extend((error >= model_bound(qtype)).then(|| format!("gpt2 {qtype}: {error}")));
        }
    }

    let bert_dir = tmp.path().join("bert-64");
    let mut cfg: bert::Config = serde_json::from_str(&std::fs::read_to_string(fixture_path("hf/bert-tiny-cls/config.json"))?)?;
    (cfg.hidden_size, cfg.intermediate_size) = (64, 128);
    random_folder::<BertForSequenceClassification>(&bert_dir, &cfg, &fixture_path("hf/bert-tiny-cls"))?;
    let ids = Tensor::new(&[[2u32, 15, 40, 77, 3, 9], [2, 60, 61, 3, 0, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu)?;
    let logits = |m: &BertForSequenceClassification| m.forward(&ids, Some(&mask), None, false);
    let hidden = |m: &BertModel| -> Result<Tensor> { Ok(m.forward(&ids, Some(&mask), None, false)?.last_hidden_state) };
    let reference = logits(&load(&bert_dir)?)?;
    let reference_hidden = hidden(&load(&bert_dir)?)?;
    for qtype in [QuantType::Q8_0, QuantType::Q4_0] {
        let out = tmp.path().join(format!("bert-{qtype}"));
        let report = quantize_folder(&ModelFiles::from_dir(&bert_dir)?, qtype, &out)?;
        assert_eq!(report.layers, 2 * 6 + 2, "six products a layer, the pooler and the classifier");
        let error = relative_error(&logits(&load(&out)?)?, &reference)?;
        // The encoder alone (as `wick embed` loads it: the classifier is left unused).
        let hidden_error = relative_error(&hidden(&load(&out)?)?, &reference_hidden)?;
        eprintln!("bert {qtype}: relative logit error {error:.4}, hidden states {hidden_error:.4}");
        failures.extend((error >= model_bound(qtype) || hidden_error >= model_bound(qtype)).then(|| format!("bert {qtype}: {error} {hidden_error}")));
    }
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}

/// A q4_0 GPT-2 packed for inference, as `wick generate` and `wick serve` hold it (its q4_0
/// layers gain the decoding layout of one- and two-row products on AVX-512 VNNI). Each layer
/// gives the unpacked layer's outputs for one and two rows within f32 rounding (the same integer
/// sums, scaled in another order: 1e-5). Through the model those differences can flip the
/// rounding of an activation to int8 in the next layer (a step of max|x|/127 in one element), so
/// the logits are compared at 1e-2 (measured 2e-3), and the greedy tokens must be the same.
/// Width 256, so that the layout applies (inputs a multiple of 128).
#[test]
fn a_packed_q4_0_gpt2_decodes_as_the_unpacked_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = tmp.path().join("gpt2-256");
    random_folder::<GPT2LMHeadModel>(&source, &gpt2::Config::new(350, 64, 256, 2, 4), &fixture_path("hf/gpt2-tiny"))?;
    let out = tmp.path().join("q4_0");
    quantize_folder(&ModelFiles::from_dir(&source)?, QuantType::Q4_0, &out)?;
    let mut unpacked = load::<GPT2LMHeadModel>(&out)?;
    let mut packed = load::<GPT2LMHeadModel>(&out)?;
    let layers = pretrained::pack_for_inference(&mut packed, wick::ops::linear::Panels::FewRows)?;
    if layers == 0 {
        eprintln!("skipped: this CPU keeps q4_0 weights as stored");
        return Ok(());
    }
    assert_eq!(layers, 2 * 4 + 1, "every block's four products and the LM head");
    for ((name, p), (_, u)) in packed.linear_layers().into_iter().zip(unpacked.linear_layers()) {
        for rows in [1, 2] {
            let x = seeded_normal((rows, p.out_in()?.1), rows as u64)?;
            let error = relative_error(&p.forward(&x)?, &u.forward(&x)?)?;
            assert!(error < 1e-5, "{name}, {rows} rows: relative error {error}");
        }
    }
    for ids in [Tensor::new(&[[17u32]], &Device::Cpu)?, Tensor::new(&[[17u32], [250]], &Device::Cpu)?] {
        let error = relative_error(&packed.forward(&ids, None, None, None, false)?, &unpacked.forward(&ids, None, None, None, false)?)?;
        assert!(error < 1e-2, "{} rows: relative logit error {error}", ids.dim(0)?);
    }
    let prompts = [vec![5u32, 100, 7], vec![349, 12]];
    let greedy = wick::generate::GenerationConfig::greedy(12);
    for rows in [&prompts[..1], &prompts[..]] {
        let (a, b) = (wick::generate::generate(&packed, rows, &greedy, None, None)?, wick::generate::generate(&unpacked, rows, &greedy, None, None)?);
        assert_eq!(a.generated_ids, b.generated_ids, "{} prompts", rows.len());
    }
    Ok(())
}

/// Written and read back, a quantized folder gives exactly the logits of the model quantized in
/// memory (with its embeddings rounded to f16, as the file stores them), the same quantized
/// bytes, and a config that unties the LM head it stores separately.
#[test]
fn gguf_round_trip_gives_the_same_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = fixture_path("hf/gpt2-tiny");
    let files = ModelFiles::from_dir(&source)?;
    let out = tmp.path().join("q8");
    quantize_folder(&files, QuantType::Q8_0, &out)?;

    // What the folder holds: the LM head untied from `wte` (quantized from the f32 `wte`), the
    // embeddings in f16.
    let cfg = gpt2::Config { tie_word_embeddings: false, ..files.config()? };
    let mut checkpoint = files.load_tensors(&Device::Cpu)?;
    checkpoint.insert("lm_head.weight".into(), checkpoint["transformer.wte.weight"].clone());
    let tensors: HashMap<String, Tensor> = GPT2LMHeadModel::canonical_names(checkpoint, &cfg)
        .into_iter()
        .map(|(name, t)| {
            let embedding = name.ends_with(".wte.weight") || name.ends_with(".wpe.weight");
            assert!(!embedding || gguf::plain_storage_type(&t) == candle_core::quantized::GgmlDType::F16);
            let stored = if embedding { t.to_dtype(DType::F16)?.to_dtype(DType::F32)? } else { t };
            Ok((name, stored))
        })
        .collect::<Result<_>>()?;
    let mut in_memory = GPT2LMHeadModel::build(wick::weights::inference_var_builder(tensors, DType::F32, &Device::Cpu), &cfg)?;
    let quantized = quantize_model(&mut in_memory, QuantType::Q8_0)?;

    let mut loaded = load::<GPT2LMHeadModel>(&out)?;
    let ids = [5u32, 100, 7, 349, 12, 0, 64];
    let read_back: HashMap<String, _> = loaded.linear_layers().into_iter().map(|(n, d)| (n, d.quantized().cloned())).collect();
    for (name, q) in &quantized {
        let back = read_back[name].as_ref().unwrap_or_else(|| panic!("{name} was not read back quantized"));
        assert_eq!((back.dtype(), back.shape().dims()), (q.dtype(), q.shape().dims()));
        assert!(back.data()? == q.data()?, "{name}: other bytes");
    }
    assert_eq!(relative_error(&gpt2_logits(&loaded, &ids)?, &gpt2_logits(&in_memory, &ids)?)?, 0.0);
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(written["tie_word_embeddings"], false);
    assert!(out.join("tokenizer.json").is_file() && !out.join("model.safetensors").exists());
    Ok(())
}

#[test]
fn a_type_that_does_not_fit_is_an_error_naming_the_tensor() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let gpt2 = ModelFiles::from_dir(&fixture_path("hf/gpt2-tiny"))?;
    let err = format!("{:#}", quantize_folder(&gpt2, QuantType::Q4K, tmp.path()).unwrap_err());
    assert!(err.contains("transformer.h.0.attn.c_attn.weight") && err.contains("256") && err.contains("q8_0 or q4_0"), "{err}");
    // bert-tiny's intermediate width, 37, fits no block at all.
    let bert = ModelFiles::from_dir(&fixture_path("hf/bert-tiny-cls"))?;
    let err = format!("{:#}", quantize_folder(&bert, QuantType::Q8_0, tmp.path()).unwrap_err());
    assert!(err.contains("bert.encoder.layer.0.output.dense.weight") && err.contains("no quantized type fits"), "{err}");
    assert!(std::fs::read_dir(tmp.path())?.next().is_none(), "nothing is written when a layer does not fit");
    Ok(())
}

#[test]
fn a_quantized_folder_is_for_inference_only() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    quantize_folder(&ModelFiles::from_dir(&fixture_path("hf/gpt2-tiny"))?, QuantType::Q4_0, tmp.path())?;
    let files = ModelFiles::from_dir(tmp.path())?;
    let cfg: gpt2::Config = files.config()?;
    let err = pretrained::load_trainable::<GPT2LMHeadModel>(&files, &cfg, &Device::Cpu, 0, |_| true).err().expect("refused");
    assert!(err.to_string().contains("inference only"), "{err}");
    let err = quantize_folder(&files, QuantType::Q8_0, &tmp.path().join("again")).unwrap_err();
    assert!(err.to_string().contains("quantized already"), "{err}");
    Ok(())
}

fn wick(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_wick")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("running wick");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wick {args:?} failed:\n{stderr}");
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("wick {args:?}: not JSON ({e}):\n{stdout}"))
}

/// `wick quantize` then `wick info` and greedy `wick generate` on the folder, which gives the
/// library's tokens for the same quantized model.
#[test]
fn the_wick_binary_quantizes_describes_and_generates() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("gpt2-q8");
    let (source, out_str) = (fixture_path("hf/gpt2-tiny"), out.to_str().unwrap());
    let report = wick(&["quantize", "--model", source.to_str().unwrap(), "--type", "q8_0", "--output", out_str, "--json"]);
    assert_eq!((report["layers"].as_u64(), report["quantization"].as_str()), (Some(9), Some("q8_0")));
    let info = wick(&["info", "--model", out_str, "--json"]);
    assert_eq!(info["quantization"], "q8_0");
    assert!(info["dtypes"]["Q8_0"].as_u64().unwrap() > 0 && info["weight_files"][0].as_str().unwrap().ends_with("model.gguf"), "{info}");
    let generated = wick(&["generate", "--model", out_str, "--prompt", "hello world", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos", "--json"]);
    let files = ModelFiles::from_dir(&out)?;
    let lm = load::<GPT2LMHeadModel>(&out)?;
    let expected = wick::generate::generate_text(&lm, &files.tokenizer()?, &["hello world"], &wick::generate::GenerationConfig::greedy(6), None)?;
    assert_eq!(generated["generated_ids"], serde_json::json!(expected.generated_ids[0]));
    Ok(())
}


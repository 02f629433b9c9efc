//! GPT-2 against transformers (tests/fixtures/make_hf_fixtures.py): logits of a left-padded
//! batch, greedy generation (unbatched and batched), the LM loss's gradient of every parameter,
//! the GPT2Model variant; the KV cache, sampling, streaming and errors.

mod common;

use wick::pretrained::Pretrained;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use common::{assert_close, fixture_path, Fixture};
use std::collections::HashMap;
use wick::generate::{self, GenerationConfig};
use wick::models::gpt2::{Config, GPT2LMHeadModel, GPT2Model};

const PROMPTS: [&str; 3] = ["The quick brown fox", "In the small café by the river, a naïve writer", "Hello"];
const EOS: u32 = 349;

fn tiny_dir() -> std::path::PathBuf {
    fixture_path("hf/gpt2-tiny")
}

fn load_tiny(device: &Device) -> Result<GPT2LMHeadModel> {
    let files = wick::hub::resolve(tiny_dir().to_str().unwrap(), &Default::default())?;
    Ok(wick::pretrained::load::<GPT2LMHeadModel>(&files, DType::F32, device)?.0)
}

fn tokenizer() -> Result<tokenizers::Tokenizer> {
    wick::tokenizer::load(&tiny_dir())
}

fn ids_of(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::U32)?.to_vec1()?)
}

/// Zeroes the positions where `mask` is 0: (batch, seq, n) values, (batch, seq) mask.
fn real_only(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?;
    Ok(x.broadcast_mul(&m)?)
}

#[test]
fn padded_batch_logits_match_transformers() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let model = load_tiny(&fx.device)?;
    let (ids, mask, pos) = (fx.get("input.input_ids")?, fx.get("input.attention_mask")?, fx.get("input.position_ids")?);
    let logits = model.forward(&ids, Some(&pos), Some(&mask), None, false)?;
    assert_close("logits", &real_only(&logits, &mask)?, &real_only(&fx.get("output.logits")?, &mask)?, 1e-4)?;
    // The same packed for inference (`wick generate`, `wick serve`), where the CPU's level packs.
    let mut packed = load_tiny(&fx.device)?;
    if wick::pretrained::pack_for_inference(&mut packed, wick::ops::linear::Panels::FewRows)? > 0 {
        let logits = packed.forward(&ids, Some(&pos), Some(&mask), None, false)?;
        assert_close("packed logits", &real_only(&logits, &mask)?, &real_only(&fx.get("output.logits")?, &mask)?, 1e-4)?;
    }
    // Padding positions too: a query with nothing to attend to gets a zero attention output,
    // as in PyTorch's SDPA (transformers' loss uses the one before each row's first token).
    assert_close("logits incl. padding", &logits, &fx.get("output.logits")?, 1e-4)?;
    // forward_last: the last column (every row's last real token).
    let last = model.forward_last(&ids, Some(&pos), Some(&mask), None)?;
    assert_close("last logits", &last, &fx.get("output.logits")?.narrow(1, 15, 1)?.squeeze(1)?, 1e-4)?;
    Ok(())
}

#[test]
fn tokenizer_gives_the_fixture_ids() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let tok = tokenizer()?;
    let encoded = generate::encode_prompts(&tok, &PROMPTS)?;
    for (i, ids) in encoded.iter().enumerate() {
        let greedy = ids_of(&fx.get(&format!("output.greedy_ids_{i}"))?)?;
        assert_eq!(ids[..], greedy[..ids.len()], "prompt {i}");
    }
    let (padded, mask, pos, t) = generate::left_pad(&encoded, EOS);
    assert_eq!(t, 16);
    assert_eq!(padded, fx.get("input.input_ids")?.flatten_all()?.to_vec1::<u32>()?);
    assert_eq!(mask, fx.get("input.attention_mask")?.flatten_all()?.to_vec1::<u32>()?);
    assert_eq!(pos, fx.get("input.position_ids")?.flatten_all()?.to_vec1::<u32>()?);
    Ok(())
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig { pad_token_id: EOS, ..GenerationConfig::greedy(n) }
}

/// (Run twice: with the weights as loaded, and packed for inference as `wick generate` and
/// `wick serve` run them, where the CPU's kernel level packs.)
#[test]
fn greedy_ids_match_transformers_unbatched_and_batched() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let mut model = load_tiny(&fx.device)?;
    greedy_ids_match(&fx, &model)?;
    if wick::pretrained::pack_for_inference(&mut model, wick::ops::linear::Panels::FewRows)? > 0 {
        greedy_ids_match(&fx, &model)?;
    }
    Ok(())
}

fn greedy_ids_match(fx: &Fixture, model: &GPT2LMHeadModel) -> Result<()> {
    let tok = tokenizer()?;
    let prompts = generate::encode_prompts(&tok, &PROMPTS)?;
    let mut expected = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let out = generate::generate(model, std::slice::from_ref(p), &greedy(20), None, None)?;
        let want = ids_of(&fx.get(&format!("output.greedy_ids_{i}"))?)?;
        assert_eq!(out.generated_ids[0], want[p.len()..], "prompt {i}");
        expected.push(out.generated_ids[0].clone());
    }
    let batched = generate::generate(model, &prompts, &greedy(20), None, None)?;
    assert_eq!(batched.generated_ids, expected, "batched left-padded generation = unbatched ones");
    // transformers' batched output: padded prompts then the new tokens.
    let hf = fx.get("output.batched_greedy_ids")?.to_vec2::<u32>()?;
    for (r, row) in hf.iter().enumerate() {
        assert_eq!(row[16..], expected[r][..]);
    }
    Ok(())
}

#[test]
fn kv_cache_decoding_equals_full_forward() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let model = load_tiny(&fx.device)?;
    let (ids, mask, pos) = (fx.get("input.input_ids")?, fx.get("input.attention_mask")?, fx.get("input.position_ids")?);
    let full = real_only(&model.forward(&ids, Some(&pos), Some(&mask), None, false)?, &mask)?;
    // The longest padding is 12 columns: a 13-column prompt pass, then one column at a time,
    // with a cache too small at first (it grows).
    let mut cache = model.new_cache(14);
    let mut parts = vec![model.forward(&ids.narrow(1, 0, 13)?, Some(&pos.narrow(1, 0, 13)?), Some(&mask.narrow(1, 0, 13)?), Some(&mut cache), false)?];
    for c in 13..16 {
        parts.push(model.forward(&ids.narrow(1, c, 1)?, Some(&pos.narrow(1, c, 1)?), Some(&mask.narrow(1, c, 1)?), Some(&mut cache), false)?);
    }
    assert_eq!(cache.len(), 16);
    let cached = real_only(&Tensor::cat(&parts, 1)?, &mask)?;
    assert_close("cached vs full logits", &cached, &full, 1e-5)?;

    // Without padding and positions: default positions continue after the cache.
    let row = ids.narrow(0, 1, 1)?;
    let full = model.forward(&row, None, None, None, false)?;
    let mut cache = model.new_cache(16);
    let a = model.forward(&row.narrow(1, 0, 10)?, None, None, Some(&mut cache), false)?;
    let b = model.forward_last(&row.narrow(1, 10, 6)?, None, None, Some(&mut cache))?;
    assert_close("prefix", &a, &full.narrow(1, 0, 10)?, 1e-5)?;
    assert_close("last after cache", &b, &full.narrow(1, 15, 1)?.squeeze(1)?, 1e-5)?;
    Ok(())
}

/// transformers' LM loss: logits at t predict ids at t+1, padding (mask 0) ignored.
fn lm_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let t = ids.dim(1)?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let target = ids.narrow(1, 1, t - 1)?.contiguous()?.unsqueeze(D::Minus1)?;
    let picked = logp.gather(&target, D::Minus1)?.squeeze(D::Minus1)?;
    let w = mask.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?;
    Ok((picked.mul(&w)?.sum_all()?.neg()? / w.sum_all()?.to_scalar::<f32>()? as f64)?)
}

#[test]
fn every_parameter_gradient_matches_transformers() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let files = wick::hub::resolve(tiny_dir().to_str().unwrap(), &Default::default())?;
    let cfg: Config = files.config()?;
    let wick::pretrained::Trainable { model, varmap, report } = wick::pretrained::load_trainable::<GPT2LMHeadModel>(&files, &cfg, &fx.device, 0, |_| true)?;
    assert!(report.warning().is_none(), "{:?}", report.warning());
    let (ids, mask, pos) = (fx.get("input.input_ids")?, fx.get("input.attention_mask")?, fx.get("input.position_ids")?);
    let loss = lm_loss(&model.forward(&ids, Some(&pos), Some(&mask), None, false)?, &ids, &mask)?;
    assert_close("loss", &loss, &fx.get("output.lm_loss")?, 1e-5)?;
    fx.check_grads(&varmap, &loss, 1e-4)?;
    Ok(())
}

#[test]
fn variant_gpt2model_without_prefix_matches() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny-variant.reference")?;
    let files = wick::hub::resolve(fixture_path("hf/gpt2-tiny-variant").to_str().unwrap(), &Default::default())?;
    let cfg: Config = files.config()?;
    assert_eq!((cfg.inner_size(), cfg.layer_norm_epsilon, cfg.scale_attn_weights), (48, 1e-6, false));
    let (model, _) = wick::pretrained::load::<GPT2Model>(&files, DType::F32, &fx.device)?;
    let (ids, mask, pos) = (fx.get("input.input_ids")?, fx.get("input.attention_mask")?, fx.get("input.position_ids")?);
    let h = model.forward(&ids, Some(&pos), Some(&mask), None, false)?;
    assert_close("last_hidden_state", &real_only(&h, &mask)?, &real_only(&fx.get("output.last_hidden_state")?, &mask)?, 1e-4)?;
    // The same checkpoint under a `transformer.` prefix loads as an LM (head tied to wte).
    let (lm, _) = wick::pretrained::load::<GPT2LMHeadModel>(&files, DType::F32, &fx.device)?;
    let logits = lm.forward(&ids, Some(&pos), Some(&mask), None, false)?;
    let expected = fx.get("output.last_hidden_state")?.broadcast_matmul(&lm.transformer.wte().t()?)?;
    assert_close("tied head", &real_only(&logits, &mask)?, &real_only(&expected, &mask)?, 1e-4)?;
    Ok(())
}

#[test]
fn config_round_trips_and_old_names_load() -> Result<()> {
    let text = std::fs::read_to_string(tiny_dir().join("config.json"))?;
    let cfg: Config = serde_json::from_str(&text)?;
    let a: serde_json::Value = serde_json::from_str(&text)?;
    let b = serde_json::to_value(&cfg)?;
    assert_eq!(a, b, "config.json round-trips");
    // Defaults are GPT-2 small's (an old config names almost nothing).
    let old: Config = serde_json::from_str(r#"{"n_ctx": 1024, "eos_token_id": [50256, 50257]}"#)?;
    assert_eq!((old.n_embd, old.n_layer, old.n_head, old.n_positions, old.vocab_size), (768, 12, 12, 1024, 50257));
    assert_eq!(old.eos_ids(), vec![50256, 50257]);
    assert_eq!(old.extra["n_ctx"], 1024);
    // Old checkpoints: no prefix, attn.bias / attn.masked_bias buffers.
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for name in ["wte.weight", "h.0.attn.bias", "h.0.attn.masked_bias", "h.0.attn.c_attn.bias", "lm_head.weight"] {
        t.insert(name.into(), Tensor::zeros(1, DType::F32, &dev)?);
    }
    let mut names: Vec<String> = <GPT2LMHeadModel as Pretrained>::canonical_names(t, &Config::new(4, 4, 4, 1, 1)).into_keys().collect();
    names.sort();
    assert_eq!(names, ["transformer.h.0.attn.c_attn.bias", "transformer.wte.weight"]);
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let dev = Device::Cpu;
    let model = load_tiny(&dev)?;
    // Too long for the 64 positions.
    let long = Tensor::zeros((1, 65), DType::U32, &dev)?;
    let err = model.forward(&long, None, None, None, false).unwrap_err().to_string();
    assert!(err.contains("64") && err.contains("context"), "{err}");
    let err = generate::generate(&model, &[vec![1; 70]], &greedy(5), None, None).unwrap_err().to_string();
    assert!(err.contains("70 tokens") && err.contains("64"), "{err}");
    let err = generate::generate(&model, &[vec![1; 60]], &greedy(10), None, None).unwrap_err().to_string();
    // The last new token is never fed back: 60 + 5 - 1 = 64 positions fit exactly.
    assert!(err.contains("at most 5 new tokens"), "{err}");
    let out = generate::generate(&model, &[vec![1; 60]], &greedy(5), None, None)?;
    assert_eq!(out.generated_ids[0].len(), 5);
    let err = generate::generate(&model, &[vec![]], &greedy(10), None, None).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let all_pad = Tensor::zeros((1, 3), DType::U32, &dev)?;
    let err = model.forward(&all_pad, None, Some(&all_pad), None, false).unwrap_err().to_string();
    assert!(err.contains("no tokens"), "{err}");

    let files = wick::hub::resolve(tiny_dir().to_str().unwrap(), &Default::default())?;
    let cfg: Config = files.config()?;
    // A missing weight: the error names it.
    let mut tensors = <GPT2LMHeadModel as Pretrained>::canonical_names(files.load_tensors(&dev)?, &cfg);
    tensors.remove("transformer.h.1.mlp.c_fc.weight");
    let err = GPT2LMHeadModel::load(wick::weights::inference_var_builder(tensors, DType::F32, &dev), &cfg).err().unwrap().to_string();
    assert!(err.contains("transformer.h.1.mlp.c_fc.weight"), "{err}");
    // A wrong shape: the error names the tensor and both shapes.
    let mut tensors = <GPT2LMHeadModel as Pretrained>::canonical_names(files.load_tensors(&dev)?, &cfg);
    tensors.insert("transformer.h.0.attn.c_proj.weight".into(), Tensor::zeros((32, 31), DType::F32, &dev)?);
    let err = format!("{:#}", GPT2LMHeadModel::load(wick::weights::inference_var_builder(tensors, DType::F32, &dev), &cfg).err().unwrap());
    assert!(err.contains("transformer.h.0.attn.c_proj.weight") && err.contains("[32, 32]") && err.contains("[32, 31]"), "{err}");
    // A config that is not GPT-2's.
    let bert = wick::hub::resolve(fixture_path("hf/bert-tiny-base").to_str().unwrap(), &Default::default())?;
    assert!(wick::pretrained::load::<GPT2LMHeadModel>(&bert, DType::F32, &dev).err().unwrap().to_string().contains("model_type"));
    Ok(())
}

#[test]
fn sampling_is_reproducible_with_a_seed() -> Result<()> {
    let dev = Device::Cpu;
    let model = load_tiny(&dev)?;
    let tok = tokenizer()?;
    let cfg = |seed| GenerationConfig {
        temperature: 1.3,
        top_k: Some(50),
        top_p: Some(0.95),
        repetition_penalty: 1.2,
        seed,
        pad_token_id: EOS,
        ..GenerationConfig::greedy(25)
    };
    let a = generate::generate_text(&model, &tok, &PROMPTS, &cfg(7), None)?;
    let b = generate::generate_text(&model, &tok, &PROMPTS, &cfg(7), None)?;
    let c = generate::generate_text(&model, &tok, &PROMPTS, &cfg(8), None)?;
    assert_eq!(a.generated_ids, b.generated_ids);
    assert_eq!(a.texts, b.texts);
    assert_ne!(a.generated_ids, c.generated_ids);
    assert!(a.generated_ids.iter().all(|g| g.len() == 25));
    // Greedy ignores the seed.
    let g = |seed| generate::generate(&model, &a.prompt_ids, &GenerationConfig { seed, ..greedy(10) }, None, None);
    assert_eq!(g(1)?.generated_ids, g(2)?.generated_ids);
    Ok(())
}

#[test]
fn eos_and_stop_strings_end_rows_and_finished_rows_stop_growing() -> Result<()> {
    let dev = Device::Cpu;
    let model = load_tiny(&dev)?;
    let tok = tokenizer()?;
    // Greedy from "Hello" produces EOS (349) as its 5th new token (see the fixture).
    let cfg = GenerationConfig { eos_token_ids: vec![EOS], ..greedy(20) };
    let out = generate::generate_text(&model, &tok, &PROMPTS, &cfg, None)?;
    assert_eq!(out.generated_ids[2].len(), 1);
    assert_eq!(*out.generated_ids[2].last().unwrap(), EOS);
    assert_eq!(out.finish_reasons[2], generate::FinishReason::Eos);
    assert_eq!(out.finish_reasons[1], generate::FinishReason::Length);
    // The other rows are unaffected by row 2 finishing (it then emits padding).
    let alone = generate::generate_text(&model, &tok, &PROMPTS[..2], &cfg, None)?;
    assert_eq!(alone.generated_ids[..], out.generated_ids[..2]);
    // A stop string: the text ends at its first occurrence's token.
    let full = generate::generate_text(&model, &tok, &PROMPTS[1..2], &greedy(20), None)?;
    let text = &full.texts[0];
    let stop: String = text.chars().skip(3).take(2).collect();
    let cfg = GenerationConfig { stop_strings: vec![stop.clone()], ..greedy(20) };
    let out = generate::generate_text(&model, &tok, &PROMPTS[1..2], &cfg, None)?;
    assert_eq!(out.finish_reasons[0], generate::FinishReason::StopString);
    assert!(out.texts[0].contains(&stop) && text.starts_with(&out.texts[0]) && out.texts[0].len() < text.len(), "{out:?}");
    Ok(())
}

#[test]
fn streaming_concatenates_to_the_final_text_with_multibyte_characters() -> Result<()> {
    let dev = Device::Cpu;
    let model = load_tiny(&dev)?;
    let tok = tokenizer()?;
    // The tiny vocabulary spells é and ï from single bytes: sampling at a high temperature
    // produces split characters and invalid bytes; check over several seeds.
    let mut saw_multibyte = false;
    for seed in 0..8 {
        let cfg = GenerationConfig { temperature: 2.0, seed, pad_token_id: EOS, ..GenerationConfig::greedy(40) };
        let mut pieces: Vec<Vec<String>> = vec![vec![]; 2];
        let mut cb = |row: usize, s: &str| pieces[row].push(s.to_string());
        let out = generate::generate_text(&model, &tok, &PROMPTS[..2], &cfg, Some(&mut cb))?;
        for r in 0..2 {
            assert_eq!(pieces[r].concat(), out.texts[r], "seed {seed} row {r}");
            assert_eq!(out.texts[r], tok.decode(&out.generated_ids[r], true).unwrap());
            // No piece but the very last may end in a replacement character.
            for p in &pieces[r][..pieces[r].len().saturating_sub(1)] {
                assert!(!p.ends_with('\u{FFFD}'), "{p:?}");
            }
            saw_multibyte |= out.texts[r].chars().any(|c| c.len_utf8() > 1 && c != '\u{FFFD}');
        }
    }
    assert!(saw_multibyte, "no multi-byte character was generated: the test proves nothing");
    // "é" split over its two byte-level tokens ("Ã" and "©": the tokenizer itself would pick
    // the merged one), streamed token by token.
    let ids: Vec<u32> = ["caf", "Ã", "©"].iter().map(|t| tok.token_to_id(t).expect("in the tiny vocabulary")).collect();
    assert!(tok.decode(&ids[1..2], true).unwrap().contains('\u{FFFD}'), "Ã alone is half of a character");
    let mut s = generate::TextStream::new();
    let mut pieces = vec![];
    for &id in &ids {
        pieces.extend(s.push(&tok, id)?);
    }
    pieces.extend(s.finish(&tok)?);
    assert_eq!(pieces.concat(), "café");
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    Ok(())
}

#[test]
fn f16_runs_close_to_f32_with_the_cache() -> Result<()> {
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let files = wick::hub::resolve(tiny_dir().to_str().unwrap(), &Default::default())?;
    let model = wick::pretrained::load::<GPT2LMHeadModel>(&files, DType::F16, &fx.device)?.0;
    let (ids, mask, pos) = (fx.get("input.input_ids")?, fx.get("input.attention_mask")?, fx.get("input.position_ids")?);
    let logits = model.forward(&ids, Some(&pos), Some(&mask), None, false)?;
    assert_eq!(logits.dtype(), DType::F16);
    assert_close("f16 logits", &real_only(&logits, &mask)?, &real_only(&fx.get("output.logits")?, &mask)?, 2e-2)?;
    let tok = tokenizer()?;
    let out = generate::generate_text(&model, &tok, &PROMPTS, &greedy(10), None)?;
    assert!(out.generated_ids.iter().all(|g| g.len() == 10));
    Ok(())
}

#[test]
fn f16_and_bf16_weights_decode_like_f32() -> Result<()> {
    // On the CPU the weights stay in f16/bf16 and the computation is f32: the logits are within
    // the weights' rounding of transformers' f32 ones, and greedy decoding gives its tokens.
    let fx = Fixture::load("hf/gpt2-tiny.reference")?;
    let files = wick::hub::resolve(tiny_dir().to_str().unwrap(), &Default::default())?;
    let tok = tokenizer()?;
    let prompts = generate::encode_prompts(&tok, &PROMPTS)?;
    let (ids, mask, pos) = (fx.get("input.input_ids")?, fx.get("input.attention_mask")?, fx.get("input.position_ids")?);
    let f32_model = load_tiny(&fx.device)?;
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        let model = wick::pretrained::load::<GPT2LMHeadModel>(&files, dtype, &fx.device)?.0;
        let logits = model.forward(&ids, Some(&pos), Some(&mask), None, false)?;
        assert_eq!(logits.dtype(), dtype);
        assert_close(&format!("{dtype:?} logits"), &real_only(&logits, &mask)?, &real_only(&fx.get("output.logits")?, &mask)?, tol)?;
        // Decoding (rows of one: our product) against the full forward pass of the same model,
        // keys and values cached in the model's dtype (read in place by the attention).
        let mut cache = model.new_cache(16);
        assert_eq!(cache.dtype(), Some(dtype));
        let row = ids.narrow(0, 1, 1)?;
        let mut last = model.forward(&row.narrow(1, 0, 12)?, None, None, Some(&mut cache), false)?.narrow(1, 11, 1)?;
        for c in 12..16 {
            last = model.forward(&row.narrow(1, c, 1)?, None, None, Some(&mut cache), false)?;
        }
        let full = model.forward(&row, None, None, None, false)?.narrow(1, 15, 1)?;
        assert_close(&format!("{dtype:?} cached"), &last, &full, 1e-2)?;
        for (i, p) in prompts.iter().enumerate() {
            let out = generate::generate(&model, std::slice::from_ref(p), &greedy(20), None, None)?;
            let want = ids_of(&fx.get(&format!("output.greedy_ids_{i}"))?)?;
            // Along transformers' greedy sequence, our logits are close to f32's; greedy picks
            // the same tokens wherever f32's best token leads the second by more than the error.
            let seq = Tensor::new(want.as_slice(), &fx.device)?.unsqueeze(0)?;
            let ours = model.forward(&seq, None, None, None, false)?.squeeze(0)?.to_dtype(DType::F32)?;
            let exact = f32_model.forward(&seq, None, None, None, false)?.squeeze(0)?;
            assert_close(&format!("{dtype:?} logits along prompt {i}"), &ours, &exact, tol)?;
            let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            for (t, &token) in out.generated_ids[0].iter().enumerate() {
                let mut row = exact.get(p.len() + t - 1)?.to_vec1::<f32>()?;
                row.sort_by(|a, b| b.total_cmp(a));
                if row[0] - row[1] < 2.0 * tol as f32 * scale {
                    break; // a near tie: either token is right at this precision
                }
                assert_eq!(token, want[p.len() + t], "{dtype:?} prompt {i}, new token {t}");
            }
            if dtype == DType::F16 {
                assert_eq!(out.generated_ids[0], want[p.len()..], "{dtype:?} prompt {i}");
            }
        }
    }
    Ok(())
}

#[test]
fn trains_with_the_trainer_and_the_export_reloads() -> Result<()> {
    use wick::train::{optim, OptimizerConfig, Schedule, Trainer, TrainerConfig};
    let dev = Device::Cpu;
    let mut cfg = Config::new(50, 16, 32, 2, 4);
    cfg.attn_pdrop = 0.1; // the dropout path of attention, in training only
    let varmap = VarMap::new();
    let model = GPT2LMHeadModel::load(wick::nn::var_builder(&varmap, DType::F32, &dev, 3), &cfg)?;
    // A periodic sequence: learnable in a few dozen steps.
    let tokens: Vec<u32> = (0..2000).map(|i| ((i * 7) % 13) as u32).collect();
    let train = wick::data::chars::TokenWindows::new(tokens, 16)?;
    let config = TrainerConfig {
        epochs: usize::MAX,
        max_steps: Some(60),
        batch_size: 8,
        lr: 3e-3,
        schedule: Schedule::CosineWarmup { warmup: 5, min_ratio: 0.1 },
        max_grad_norm: Some(1.0),
        eval_each_epoch: false,
        progress: false,
        ..Default::default()
    };
    let opt = OptimizerConfig::adamw(0.1).build(optim::params(&varmap, optim::is_bias_or_norm))?;
    let report = Trainer::new(config, varmap.clone(), opt, dev.clone()).fit(&model, &train, None)?;
    let (first, last) = (report.train_losses[0].1, report.train_losses.last().unwrap().1);
    assert!(last < 0.5 * first, "loss {first} → {last}");

    let dir = tempfile::tempdir()?;
    let tensors = wick::train::checkpoint::varmap_tensors(&varmap)?;
    assert!(!tensors.contains_key("lm_head.weight"), "the head is tied");
    wick::pretrained::save::<GPT2LMHeadModel>(dir.path(), &cfg, tensors, None)?;
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    assert_eq!(saved["model_type"], "gpt2");
    let reloaded = wick::pretrained::load::<GPT2LMHeadModel>(&wick::weights::ModelFiles::from_dir(dir.path())?, DType::F32, &dev)?.0;
    let ids = Tensor::new(&[[1u32, 8, 2, 9, 3]], &dev)?;
    let a = model.forward(&ids, None, None, None, false)?;
    let b = reloaded.forward(&ids, None, None, None, false)?;
    assert_close("reloaded logits", &b, &a, 1e-6)?;
    Ok(())
}

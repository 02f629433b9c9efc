//! Sentence pairs are encoded as transformers encodes them: `[CLS] A [SEP] B [SEP]` with token
//! type ids 0 then 1, cut longest segment first; checked against the ids transformers' tokenizer
//! gives (tests/fixtures/make_pair_tokenization_fixture.py), for the tokenizer read from
//! `tokenizer.json` and the one wick builds from `vocab.txt` alone.

mod common;

use anyhow::Result;
use candle_core::Device;
use common::fixture_path;
use serde::Deserialize;
use wick::data::text::{Targets, TextExample, TokenizedTexts};
use wick::data::Dataset;
use wick::tokenizer::{encode_pairs_truncated, encode_truncated};

#[derive(Deserialize)]
struct Case {
    text: String,
    text_pair: Option<String>,
    max_length: Option<usize>,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
}

fn cases() -> Result<Vec<Case>> {
    #[derive(Deserialize)]
    struct File {
        cases: Vec<Case>,
    }
    let text = std::fs::read_to_string(fixture_path("hf/bert-tiny-cls.pairs.json"))?;
    Ok(serde_json::from_str::<File>(&text)?.cases)
}

/// The fixture model's tokenizer from `tokenizer.json`, and rebuilt from `vocab.txt` and
/// `tokenizer_config.json` only.
fn tokenizers() -> Result<Vec<(&'static str, tokenizers::Tokenizer, tempfile::TempDir)>> {
    let dir = fixture_path("hf/bert-tiny-cls");
    let from_json = wick::tokenizer::load(&dir)?;
    let vocab_only = tempfile::tempdir()?;
    for name in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(dir.join(name), vocab_only.path().join(name))?;
    }
    let from_vocab = wick::tokenizer::load(vocab_only.path())?;
    Ok(vec![("tokenizer.json", from_json, tempfile::tempdir()?), ("vocab.txt", from_vocab, vocab_only)])
}

#[test]
fn pairs_and_truncation_match_transformers() -> Result<()> {
    let cases = cases()?;
    assert!(cases.iter().filter(|c| c.text_pair.is_some() && c.max_length.is_some_and(|n| n < 12)).count() >= 5);
    for (source, tokenizer, _dir) in tokenizers()? {
        for case in &cases {
            let max_len = case.max_length.unwrap_or(512);
            let (rows, truncated) = match &case.text_pair {
                Some(b) => encode_pairs_truncated(&tokenizer, &[&case.text], &[b], max_len)?,
                None => encode_truncated(&tokenizer, &[&case.text], max_len)?,
            };
            let what = format!("{source}: {:?} / {:?} at {:?}", case.text, case.text_pair, case.max_length);
            assert_eq!(rows[0].0, case.input_ids, "input ids of {what}");
            assert_eq!(rows[0].1, case.token_type_ids, "token type ids of {what}");
            let untruncated = match &case.text_pair {
                Some(b) => encode_pairs_truncated(&tokenizer, &[&case.text], &[b], 512)?.0[0].0.len(),
                None => encode_truncated(&tokenizer, &[&case.text], 512)?.0[0].0.len(),
            };
            assert_eq!(truncated, usize::from(untruncated > max_len), "truncation count of {what}");
        }
    }
    Ok(())
}

#[test]
fn pair_datasets_batch_segment_ids_and_pad() -> Result<()> {
    let cases = cases()?;
    let pairs: Vec<&Case> = cases.iter().filter(|c| c.text_pair.is_some() && c.max_length == Some(10)).collect();
    let examples: Vec<TextExample> = pairs.iter().map(|c| TextExample::unlabelled(c.text.clone(), c.text_pair.clone())).collect();
    let tokenizer = wick::tokenizer::load(&fixture_path("hf/bert-tiny-cls"))?;
    let set = TokenizedTexts::new(&tokenizer, &examples, Targets::Scores(vec![1.5, 4.0]), 10, 0)?;
    assert_eq!(set.truncated, 2);
    let batch = set.batch(&[1, 0], &Device::Cpu)?;
    assert_eq!(batch.input_ids.to_vec2::<u32>()?, [pairs[1].input_ids.clone(), pairs[0].input_ids.clone()]);
    assert_eq!(batch.token_type_ids.to_vec2::<u32>()?, [pairs[1].token_type_ids.clone(), pairs[0].token_type_ids.clone()]);
    assert_eq!(batch.labels.unwrap().to_vec1::<f32>()?, [4.0, 1.5]);
    Ok(())
}

#[test]
fn a_maximum_length_without_room_for_the_special_tokens_is_an_error() -> Result<()> {
    let tokenizer = wick::tokenizer::load(&fixture_path("hf/bert-tiny-cls"))?;
    let err = encode_pairs_truncated(&tokenizer, &["a"], &["b"], 2).unwrap_err().to_string();
    assert!(err.contains("max length 2") && err.contains("3 special tokens"), "{err}");
    assert!(encode_truncated(&tokenizer, &["a"], 1).is_err());
    assert!(encode_pairs_truncated(&tokenizer, &["a", "b"], &["c"], 8).is_err());
    let mixed = [TextExample::unlabelled("a", Some("b".into())), TextExample::unlabelled("c", None)];
    let err = TokenizedTexts::new(&tokenizer, &mixed, Targets::None, 8, 0).err().unwrap().to_string();
    assert!(err.contains("some examples are sentence pairs"), "{err}");
    Ok(())
}

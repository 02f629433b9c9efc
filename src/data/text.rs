//! Labelled text files for fine-tuning and prediction: TSV (GLUE's files as they are), CSV or
//! JSON lines; single texts or sentence pairs; class labels or numeric scores (regression).
//!
//! Reading is two steps so that every error can name the file, the line and the column: a
//! [`TextFile`] keeps each row's text(s), its label as written and its line number; the labels
//! become class ids ([`TextFile::class_ids`]) or scores ([`TextFile::scores`]) once the caller
//! knows the task. [`TokenizedTexts`] is the tokenized form the trainer draws batches from.

use crate::tokenizer::{encode_pairs_truncated, encode_truncated, pad_right, Tokens};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// Which columns hold the text(s) and the label; a name left out is detected from the header
/// (GLUE's SST-2, MRPC, QQP, QNLI, RTE, MNLI and STS-B layouts, and common names).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TextColumns {
    /// Text column (default: the first segment of a known sentence-pair layout, else the first
    /// of sentence, text, review, content).
    #[arg(long = "text-column", value_name = "COLUMN")]
    pub text: Option<String>,
    /// Column of the second text of a sentence pair (default: detected with the text column;
    /// none for single texts).
    #[arg(long = "text-pair-column", value_name = "COLUMN")]
    pub text_pair: Option<String>,
    /// Label column (default: the first of label, labels, gold_label, score, quality,
    /// is_duplicate, target, class).
    #[arg(long = "label-column", value_name = "COLUMN")]
    pub label: Option<String>,
}

/// Sentence-pair layouts tried in order when no text column is named: (segment A, segment B).
/// RTE, MNLI, STS-B, WNLI; MRPC; QQP; QNLI; MNLI/SNLI as the `datasets` library writes them.
pub const PAIR_COLUMNS: &[(&str, &str)] = &[
    ("sentence1", "sentence2"),
    ("#1 String", "#2 String"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
];
/// Single-text columns tried in order when no pair layout matches.
pub const TEXT_COLUMNS: &[&str] = &["sentence", "text", "review", "content"];
/// Label columns tried in order (MNLI's `gold_label`, STS-B's `score`, MRPC's `Quality`, QQP's
/// `is_duplicate`).
pub const LABEL_COLUMNS: &[&str] = &["label", "labels", "gold_label", "score", "quality", "is_duplicate", "target", "class"];

/// The columns a file was read with, named as in its header.
#[derive(Clone, Debug, PartialEq)]
pub struct ChosenColumns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextExample {
    pub text: String,
    /// Segment B of a sentence pair.
    pub text_pair: Option<String>,
    /// The label as written in the file (`None` when the file has no label column).
    pub label: Option<String>,
    /// Line of the file the row starts on (1 = the header of a TSV/CSV file).
    pub line: usize,
}

impl TextExample {
    /// A text (or pair) with no label and no file, as `predict --text` takes it.
    pub fn unlabelled(text: impl Into<String>, text_pair: Option<String>) -> Self {
        Self { text: text.into(), text_pair, label: None, line: 0 }
    }
}

/// The rows of a text file, with where they came from.
#[derive(Clone, Debug)]
pub struct TextFile {
    pub path: PathBuf,
    pub columns: ChosenColumns,
    pub examples: Vec<TextExample>,
}

/// Reads a text file, choosing the format by extension (`.tsv`/`.txt`, `.csv`, `.jsonl`/`.json`/
/// `.ndjson`). TSV and CSV need a header row; every row must have as many fields as the header.
/// A missing label column is an error only when `label_required`. Errors name the file, the
/// line and the column.
pub fn read_text_file(path: &Path, columns: &TextColumns, label_required: bool) -> Result<TextFile> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let file = match ext.as_str() {
        "tsv" | "txt" => read_delimited(path, b'\t', false, columns, label_required)?,
        "csv" => read_delimited(path, b',', true, columns, label_required)?,
        "jsonl" | "json" | "ndjson" => read_jsonl(path, columns, label_required)?,
        _ => bail!("{}: unknown text format {ext:?}: use .tsv, .csv or .jsonl", path.display()),
    };
    if file.examples.is_empty() {
        bail!("{}: no examples (the file is empty or has only a header)", path.display());
    }
    Ok(file)
}

/// Chooses the columns of `header` as `asked` says, or by the layouts above; column indices in
/// the order text, text pair, label. The error lists the file's columns.
fn choose_columns(header: &[String], asked: &TextColumns, label_required: bool) -> Result<(ChosenColumns, [Option<usize>; 3]), String> {
    let find = |name: &str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(name.trim()));
    let require = |name: &str, what: &str| find(name).ok_or_else(|| format!("no {what} column {name:?}; the file's columns are {header:?}"));
    let first_of = |names: &[&str]| names.iter().find_map(|n| find(n));
    let (text, pair) = match (&asked.text, &asked.text_pair) {
        (Some(t), p) => (require(t, "text")?, p.as_deref().map(|p| require(p, "text pair")).transpose()?),
        (None, Some(p)) => {
            let pair = require(p, "text pair")?;
            let partner = PAIR_COLUMNS.iter().filter(|(_, b)| find(b) == Some(pair)).find_map(|(a, _)| find(a));
            let single = TEXT_COLUMNS.iter().filter_map(|n| find(n)).find(|&i| i != pair);
            let text = partner.or(single).ok_or_else(|| format!("no text column to pair with {p:?} (looked for {TEXT_COLUMNS:?}); the file's columns are {header:?}"))?;
            (text, Some(pair))
        }
        (None, None) => match PAIR_COLUMNS.iter().find_map(|(a, b)| find(a).zip(find(b))) {
            Some((a, b)) => (a, Some(b)),
            None => {
                let text = first_of(TEXT_COLUMNS).ok_or_else(|| format!("no text column (looked for {TEXT_COLUMNS:?} and the pairs {PAIR_COLUMNS:?}; name one with --text-column); the file's columns are {header:?}"))?;
                (text, None)
            }
        },
    };
    let label = match &asked.label {
        Some(l) => Some(require(l, "label")?),
        None => first_of(LABEL_COLUMNS),
    };
    if label.is_none() && label_required {
        return Err(format!("no label column (looked for {LABEL_COLUMNS:?}; name one with --label-column); the file's columns are {header:?}"));
    }
    let name = |i: usize| header[i].trim().to_string();
    let chosen = ChosenColumns { text: name(text), text_pair: pair.map(name), label: label.map(name) };
    Ok((chosen, [Some(text), pair, label]))
}

fn read_delimited(path: &Path, delimiter: u8, quoting: bool, asked: &TextColumns, label_required: bool) -> Result<TextFile> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        // GLUE's TSV files are not quoted: a `"` inside a sentence is just a character.
        .quoting(quoting)
        // Ragged rows are reported below with the file's line, not as csv's own error.
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{} line 1: cannot read the header", path.display()))?
        .iter()
        .map(String::from)
        .collect();
    let (columns, [text, pair, label]) = choose_columns(&header, asked, label_required).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let text = text.expect("a text column is always chosen");
    let mut examples = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("{}: malformed row", path.display()))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        if record.len() != header.len() {
            bail!("{} line {line}: {} fields, the header has {} (a ragged row; a TSV field may not hold a tab)", path.display(), record.len(), header.len());
        }
        examples.push(TextExample {
            text: record[text].trim().to_string(),
            text_pair: pair.map(|i| record[i].trim().to_string()),
            label: label.map(|i| record[i].trim().to_string()),
            line,
        });
    }
    Ok(TextFile { path: path.to_path_buf(), columns, examples })
}

fn read_jsonl(path: &Path, asked: &TextColumns, label_required: bool) -> Result<TextFile> {
    let content = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut columns: Option<ChosenColumns> = None;
    let mut examples = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{} line {n}: not valid JSON", path.display()))?;
        let obj = value.as_object().with_context(|| format!("{} line {n}: expected a JSON object", path.display()))?;
        // The first object's keys play the header's part.
        let columns = match &columns {
            Some(c) => c,
            None => {
                let keys: Vec<String> = obj.keys().cloned().collect();
                let (chosen, _) = choose_columns(&keys, asked, label_required).map_err(|e| anyhow::anyhow!("{} line {n}: {e}", path.display()))?;
                columns.insert(chosen)
            }
        };
        let get = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.trim().to_string()),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Ok(v.to_string()),
                Some(_) => bail!("{} line {n}: field {name:?} is not a string or number", path.display()),
                None => bail!("{} line {n}: no field {name:?} (the first row has it)", path.display()),
            }
        };
        examples.push(TextExample {
            text: get(&columns.text)?,
            text_pair: columns.text_pair.as_deref().map(get).transpose()?,
            label: columns.label.as_deref().map(get).transpose()?,
            line: n,
        });
    }
    let Some(columns) = columns else { bail!("{}: no examples (the file is empty)", path.display()) };
    Ok(TextFile { path: path.to_path_buf(), columns, examples })
}

impl TextFile {
    /// Keeps the first `n` rows (all when `n` is `None`).
    pub fn truncate(&mut self, n: Option<usize>) {
        self.examples.truncate(n.unwrap_or(usize::MAX));
    }

    pub fn has_labels(&self) -> bool {
        self.columns.label.is_some()
    }

    /// "FILE line N, column "C"", for errors about one row's label.
    fn where_label(&self, e: &TextExample) -> String {
        format!("{} line {}, column {:?}", self.path.display(), e.line, self.columns.label.as_deref().unwrap_or(""))
    }

    fn labels(&self) -> Result<impl Iterator<Item = (&TextExample, &str)>> {
        if !self.has_labels() {
            bail!("{}: no label column", self.path.display());
        }
        Ok(self.examples.iter().map(|e| (e, e.label.as_deref().unwrap_or(""))))
    }

    /// Every row's class id in `labels`; an unknown or empty label is an error naming its line.
    pub fn class_ids(&self, labels: &LabelSet) -> Result<Vec<u32>> {
        self.labels()?.map(|(e, l)| labels.id(l).with_context(|| self.where_label(e))).collect()
    }

    /// Every row's label as a number (regression targets); anything else is an error naming
    /// its line.
    pub fn scores(&self) -> Result<Vec<f32>> {
        self.labels()?
            .map(|(e, l)| match l.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => bail!("{}: label {l:?} is not a finite number, and regression needs numeric labels", self.where_label(e)),
            })
            .collect()
    }

    /// True when the labels look like regression scores: all numbers, and not all integers (as
    /// STS-B's 0.0–5.0 similarity scores).
    pub fn labels_look_like_scores(&self) -> bool {
        let values: Option<Vec<f64>> = self.examples.iter().map(|e| e.label.as_deref()?.parse::<f64>().ok().filter(|x| x.is_finite())).collect();
        values.is_some_and(|v| !v.is_empty() && v.iter().any(|x| x.fract() != 0.0))
    }
}

/// The classes of a classifier, in id order.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSet {
    pub names: Vec<String>,
}

impl LabelSet {
    /// The labels seen in a training set, in a stable order: numerically when every label is an
    /// integer (so GLUE's "0"/"1" become ids 0/1), else alphabetically.
    pub fn from_examples(examples: &[TextExample]) -> Self {
        let mut names: Vec<String> = examples.iter().filter_map(|e| e.label.clone()).collect();
        names.sort();
        names.dedup();
        if names.iter().all(|n| n.parse::<i64>().is_ok()) {
            names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
        }
        Self { names }
    }

    /// The id of `label`. A model whose config names no labels has transformers' `LABEL_i`;
    /// there the integer `i` as written in a data file is accepted too.
    pub fn id(&self, label: &str) -> Result<u32> {
        if let Some(i) = self.names.iter().position(|n| n == label) {
            return Ok(i as u32);
        }
        if let Ok(i) = label.parse::<usize>() {
            if self.names.get(i).is_some_and(|n| *n == format!("LABEL_{i}")) {
                return Ok(i as u32);
            }
        }
        bail!("label {label:?} is not one of the model's labels {:?}", self.names)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// What a model learns from each text: nothing (prediction), a class id, or a score.
#[derive(Clone, Debug)]
pub enum Targets {
    None,
    Classes(Vec<u32>),
    Scores(Vec<f32>),
}

impl Targets {
    fn len(&self) -> Option<usize> {
        match self {
            Self::None => None,
            Self::Classes(v) => Some(v.len()),
            Self::Scores(v) => Some(v.len()),
        }
    }
}

/// Tokenized texts (or pairs) with their targets; each batch is padded to its own longest row
/// (dynamic padding).
pub struct TokenizedTexts {
    rows: Vec<Tokens>,
    targets: Targets,
    pad_id: u32,
    /// How many texts were cut to the maximum length.
    pub truncated: usize,
}

/// One padded batch of [`TokenizedTexts`]: (batch, seq) u32 tensors, and (batch,) targets: u32
/// class ids or f32 scores (`None` without targets).
pub struct TextBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
    pub labels: Option<Tensor>,
}

impl TokenizedTexts {
    /// Tokenizes `examples` with special tokens, each cut to `max_len` tokens (a pair is cut
    /// longest segment first, as transformers does), with one target per example.
    pub fn new(tokenizer: &tokenizers::Tokenizer, examples: &[TextExample], targets: Targets, max_len: usize, pad_id: u32) -> Result<Self> {
        if examples.is_empty() {
            bail!("no examples to tokenize");
        }
        if let Some(n) = targets.len().filter(|&n| n != examples.len()) {
            bail!("{n} targets for {} examples", examples.len());
        }
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let pairs: Option<Vec<&str>> = examples.iter().map(|e| e.text_pair.as_deref()).collect();
        let (rows, truncated) = match pairs {
            Some(pairs) => encode_pairs_truncated(tokenizer, &texts, &pairs, max_len)?,
            None if examples.iter().any(|e| e.text_pair.is_some()) => bail!("some examples are sentence pairs and some are not"),
            None => encode_truncated(tokenizer, &texts, max_len)?,
        };
        Ok(Self { rows, targets, pad_id, truncated })
    }

    /// Mean tokens per row.
    pub fn mean_len(&self) -> f64 {
        self.rows.iter().map(|r| r.0.len()).sum::<usize>() as f64 / self.rows.len().max(1) as f64
    }

    /// The token ids and token type ids of row `i`.
    pub fn row(&self, i: usize) -> Option<&Tokens> {
        self.rows.get(i)
    }
}

impl super::Dataset for TokenizedTexts {
    type Batch = TextBatch;
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Result<TextBatch> {
        let rows: Vec<&Tokens> = indices.iter().map(|&i| &self.rows[i]).collect();
        let (input_ids, attention_mask, token_type_ids) = pad_right(&rows, self.pad_id, device)?;
        let labels = match &self.targets {
            Targets::None => None,
            Targets::Classes(ids) => Some(Tensor::from_vec(indices.iter().map(|&i| ids[i]).collect(), indices.len(), device)?),
            Targets::Scores(scores) => Some(Tensor::from_vec(indices.iter().map(|&i| scores[i]).collect(), indices.len(), device)?),
        };
        Ok(TextBatch { input_ids, attention_mask, token_type_ids, labels })
    }
}

#[cfg(test)]
mod tests;

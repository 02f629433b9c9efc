//! Text-classification files: TSV (GLUE's `sentence<TAB>label`), CSV, or JSON lines.

use anyhow::{bail, Context, Result};
use crate::tokenizer::{encode_truncated, pad_right, Tokens};
use candle_core::{Device, Tensor};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct TextExample {
    pub text: String,
    /// The label as written in the file; [`LabelSet`] maps it to a class id.
    pub label: String,
}

/// Column names tried, in order, when the caller names none.
pub const TEXT_COLUMNS: &[&str] = &["sentence", "text", "review", "content"];
pub const LABEL_COLUMNS: &[&str] = &["label", "labels", "target", "class"];

/// Reads a labelled text file, choosing the format by extension (`.tsv`, `.csv`, `.jsonl`/`.json`).
/// TSV and CSV need a header row. Columns are `text_column`/`label_column` when given, else the
/// first of [`TEXT_COLUMNS`]/[`LABEL_COLUMNS`] present. Errors name the file and the line.
pub fn read_text_classification(path: &Path, text_column: Option<&str>, label_column: Option<&str>) -> Result<Vec<TextExample>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let examples = match ext.as_str() {
        "tsv" | "txt" => read_delimited(path, b'\t', false, text_column, label_column)?,
        "csv" => read_delimited(path, b',', true, text_column, label_column)?,
        "jsonl" | "json" | "ndjson" => read_jsonl(path, text_column, label_column)?,
        _ => bail!("{}: unknown text format {ext:?}: use .tsv, .csv or .jsonl", path.display()),
    };
    if examples.is_empty() {
        bail!("{}: no examples (the file is empty or has only a header)", path.display());
    }
    Ok(examples)
}

fn pick_column(path: &Path, header: &[String], wanted: Option<&str>, defaults: &[&str], what: &str) -> Result<usize> {
    let candidates: Vec<&str> = match wanted {
        Some(w) => vec![w],
        None => defaults.to_vec(),
    };
    for c in &candidates {
        if let Some(i) = header.iter().position(|h| h.trim().eq_ignore_ascii_case(c)) {
            return Ok(i);
        }
    }
    bail!("{} line 1: no {what} column (looked for {candidates:?}; the header has {header:?})", path.display())
}

fn read_delimited(path: &Path, delimiter: u8, quoting: bool, text_col: Option<&str>, label_col: Option<&str>) -> Result<Vec<TextExample>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        // GLUE's TSV files are not quoted: a `"` inside a sentence is just a character.
        .quoting(quoting)
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{} line 1: cannot read the header", path.display()))?
        .iter()
        .map(String::from)
        .collect();
    let ti = pick_column(path, &header, text_col, TEXT_COLUMNS, "text")?;
    let li = pick_column(path, &header, label_col, LABEL_COLUMNS, "label")?;
    let mut out = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let line = row + 2;
        let record = record.with_context(|| format!("{} line {line}: malformed row", path.display()))?;
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        let (Some(text), Some(label)) = (record.get(ti), record.get(li)) else {
            bail!("{} line {line}: {} fields, the header has {}", path.display(), record.len(), header.len());
        };
        let label = label.trim();
        if label.is_empty() {
            bail!("{} line {line}: empty label", path.display());
        }
        out.push(TextExample { text: text.trim().to_string(), label: label.to_string() });
    }
    Ok(out)
}

fn read_jsonl(path: &Path, text_col: Option<&str>, label_col: Option<&str>) -> Result<Vec<TextExample>> {
    let content = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} line {n}: not valid JSON", path.display()))?;
        let obj = value.as_object().with_context(|| format!("{} line {n}: expected a JSON object", path.display()))?;
        let get = |wanted: Option<&str>, defaults: &[&str], what: &str| -> Result<String> {
            let names: Vec<&str> = wanted.map(|w| vec![w]).unwrap_or_else(|| defaults.to_vec());
            for name in &names {
                match obj.get(*name) {
                    Some(serde_json::Value::String(s)) => return Ok(s.clone()),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => return Ok(v.to_string()),
                    Some(_) => bail!("{} line {n}: field {name:?} is not a string or number", path.display()),
                    None => {}
                }
            }
            bail!("{} line {n}: no {what} field (looked for {names:?})", path.display())
        };
        out.push(TextExample {
            text: get(text_col, TEXT_COLUMNS, "text")?,
            label: get(label_col, LABEL_COLUMNS, "label")?,
        });
    }
    Ok(out)
}

/// The classes seen in a training set, in a stable order: numerically when every label is an
/// integer (so GLUE's "0"/"1" become ids 0/1), else alphabetically.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSet {
    pub names: Vec<String>,
}

impl LabelSet {
    pub fn from_examples(examples: &[TextExample]) -> Self {
        let mut names: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
        names.sort();
        names.dedup();
        if names.iter().all(|n| n.parse::<i64>().is_ok()) {
            names.sort_by_key(|n| n.parse::<i64>().unwrap());
        }
        Self { names }
    }

    pub fn id(&self, label: &str) -> Result<u32> {
        match self.names.iter().position(|n| n == label) {
            Some(i) => Ok(i as u32),
            None => bail!("label {label:?} is not one of the training labels {:?}", self.names),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Tokenized, labelled texts; each batch is padded to its own longest text (dynamic padding).
pub struct TokenizedTexts {
    rows: Vec<Tokens>,
    labels: Vec<u32>,
    pad_id: u32,
    /// How many texts were cut to the maximum length.
    pub truncated: usize,
}

/// One padded batch of [`TokenizedTexts`]: (batch, seq) u32 tensors and (batch,) labels.
pub struct TextBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
    pub labels: Tensor,
}

impl TokenizedTexts {
    /// Tokenizes `examples` with special tokens, keeping at most `max_len` tokens (the closing
    /// special token is kept), and maps their labels through `labels`.
    pub fn new(tokenizer: &tokenizers::Tokenizer, examples: &[TextExample], labels: &LabelSet, max_len: usize, pad_id: u32) -> Result<Self> {
        if examples.is_empty() {
            bail!("no examples to tokenize");
        }
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let (rows, truncated) = encode_truncated(tokenizer, &texts, max_len)?;
        let labels = examples.iter().map(|e| labels.id(&e.label)).collect::<Result<_>>()?;
        Ok(Self { rows, labels, pad_id, truncated })
    }

    /// Mean tokens per text.
    pub fn mean_len(&self) -> f64 {
        self.rows.iter().map(|r| r.0.len()).sum::<usize>() as f64 / self.rows.len().max(1) as f64
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
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        Ok(TextBatch { input_ids, attention_mask, token_type_ids, labels: Tensor::from_vec(labels, indices.len(), device)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn reads_glue_tsv_csv_and_jsonl() -> Result<()> {
        let d = tempfile::tempdir()?;
        let tsv = write(d.path(), "a.tsv", "sentence\tlabel\nit 's \"great\" \t1\na dull , tired film \t0\n");
        let ex = read_text_classification(&tsv, None, None)?;
        assert_eq!(ex[0], TextExample { text: "it 's \"great\"".into(), label: "1".into() });
        assert_eq!(ex.len(), 2);
        let csv = write(d.path(), "b.csv", "id,text,label\n1,\"hello, world\",pos\n2,bye,neg\n");
        let ex = read_text_classification(&csv, None, None)?;
        assert_eq!(ex[0].text, "hello, world");
        let labels = LabelSet::from_examples(&ex);
        assert_eq!(labels.names, vec!["neg", "pos"]);
        assert_eq!(labels.id("pos")?, 1);
        assert!(labels.id("meh").is_err());
        let jsonl = write(d.path(), "c.jsonl", "{\"text\": \"a\", \"label\": 10}\n\n{\"text\": \"b\", \"label\": 2}\n");
        let ex = read_text_classification(&jsonl, None, None)?;
        assert_eq!(LabelSet::from_examples(&ex).names, vec!["2", "10"]);
        Ok(())
    }

    #[test]
    fn malformed_files_name_file_and_line() -> Result<()> {
        let d = tempfile::tempdir()?;
        let p = write(d.path(), "x.tsv", "sentence\tlabel\n");
        assert!(read_text_classification(&p, None, None).unwrap_err().to_string().contains("no examples"));
        let p = write(d.path(), "y.tsv", "sentence\tlabel\nok\t1\nbroken line\n");
        let err = format!("{:#}", read_text_classification(&p, None, None).unwrap_err());
        assert!(err.contains("y.tsv line 3"), "{err}");
        let p = write(d.path(), "z.jsonl", "{\"text\": \"a\", \"label\": 1}\n{oops\n");
        let err = format!("{:#}", read_text_classification(&p, None, None).unwrap_err());
        assert!(err.contains("z.jsonl line 2"), "{err}");
        let p = write(d.path(), "w.tsv", "body\tlabel\nx\t1\n");
        let err = read_text_classification(&p, None, None).unwrap_err().to_string();
        assert!(err.contains("no text column"), "{err}");
        assert!(read_text_classification(&p, Some("body"), None).is_ok());
        Ok(())
    }
}

//! What a run shows and leaves behind besides checkpoints: the progress bar, and `metrics.jsonl`
//! (one JSON object a line, kept as one curve across resumes) with its picture `loss_curve.svg`.

use super::{plot, Metrics};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

pub(super) fn progress_bar(show: bool, total: usize, position: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total as u64), if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_position(position as u64);
    bar
}

/// `metrics.jsonl` in the output folder: one JSON object a line, kept across resumes.
pub(super) struct MetricsLog {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    pub last_eval_step: Option<usize>,
}

impl MetricsLog {
    /// Opens the log for appending; after a resume from step `s`, records past `s` (written
    /// after that checkpoint by the interrupted run) are dropped so the curve stays one curve.
    pub fn open(output: Option<&Path>, resumed_from: Option<usize>) -> Result<Self> {
        let Some(out) = output else { return Ok(Self { path: None, file: None, last_eval_step: None }) };
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join("metrics.jsonl");
        let kept: String = match (resumed_from, std::fs::read_to_string(&path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= step))
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        let last_eval_step = kept
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "eval")
            .filter_map(|v| v["step"].as_u64())
            .next_back()
            .map(|s| s as usize);
        std::fs::write(&path, &kept).with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Self { path: Some(path), file: Some(file), last_eval_step })
    }

    pub fn write(&mut self, record: serde_json::Value) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{record}")?;
        }
        Ok(())
    }

    /// An evaluation record: `eval_loss`, `eval_accuracy`, ... at `step`.
    pub fn write_eval(&mut self, step: usize, epoch: usize, metrics: &Metrics) -> Result<()> {
        self.last_eval_step = Some(step);
        let mut record = serde_json::json!({"type": "eval", "step": step, "epoch": epoch});
        for (k, v) in metrics {
            record[format!("eval_{k}")] = (*v).into();
        }
        self.write(record)
    }

    pub fn plot(&self, svg: &Path) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let (mut train, mut eval) = (vec![], vec![]);
        for line in std::fs::read_to_string(path)?.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let step = v["step"].as_u64().unwrap_or(0) as usize;
            match (v["type"].as_str(), v["loss"].as_f64(), v["eval_loss"].as_f64()) {
                (Some("train"), Some(l), _) => train.push((step, l)),
                (Some("eval"), _, Some(l)) => eval.push((step, l)),
                _ => {}
            }
        }
        plot::loss_curve(svg, "wick training", &train, &eval)
    }
}

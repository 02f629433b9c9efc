//! `wick prune`: prune a BERT classifier or a GPT-2 LM (see [`crate::compress::prune`]),
//! optionally fine-tune it to recover (with the masks held: pruned weights stay zero), and save
//! it as a Hugging Face folder.
//!
//! - `--sparsity S [--per-layer]`: unstructured magnitude pruning of the transformer layers'
//!   linear weights; saved dense (the zeros are in the file), so the folder is no smaller or
//!   faster by itself. Several values (`--sparsity 0,0.3,0.5,0.7,0.9`) run a sweep: one folder
//!   each, and the evaluation metric against sparsity as a table (`sweep.json`) and a picture
//!   (`sweep.svg`).
//! - `--ffn-keep F`: keeps the fraction F of FFN neurons in every layer (a smaller
//!   `intermediate_size`/`n_inner`): a really smaller, faster model.
//! - `--drop-layers 1,3`: removes whole layers (a smaller `num_hidden_layers`/`n_layer`).

use crate::cli::{at_least_one, probability, ModelArgs};
use crate::compress::prune::{self, Masks, Scope};
use crate::compress::recovery::{self, Family, TrainingArgs};
use crate::compress::{layers, weight_stats, Checkpoint};
use crate::data::{Batching, Dataset};
use crate::models::bert::BertForSequenceClassification;
use crate::models::gpt2::GPT2LMHeadModel;
use crate::train::UpdateHook;
use anyhow::{bail, Context, Result};
use clap::ArgGroup;

/// How FFN neurons are ranked.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Importance {
    /// ‖up-projection row‖ · ‖down-projection column‖ of each neuron: weights alone.
    Norm,
    /// Michel et al. 2019: |∂loss/∂gate| of each neuron summed over --importance-batches
    /// training batches (needs --data).
    Gradient,
}

/// Prune a BERT classifier or a GPT-2 language model: unstructured magnitude pruning to a
/// sparsity, FFN neurons, or whole layers; then, with --data, fine-tune it to recover (pruned
/// weights stay exactly zero) and save it as a Hugging Face folder in --output.
#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("method").required(true).args(["sparsity", "ffn_keep", "drop_layers"])))]
pub struct PruneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Set this fraction (0 to <1) of the transformer layers' linear weights to zero, the
    /// smallest in magnitude (embeddings, pooler, task head, LayerNorms and biases are kept).
    /// Several values, comma-separated, run a sweep: the model pruned to each (and recovered,
    /// with --data) in --output/sparsity-S, and --output/sweep.json and sweep.svg with the
    /// evaluation metric (with --eval) against sparsity, before and after recovery.
    #[arg(long, value_delimiter = ',')]
    pub sparsity: Option<Vec<f64>>,
    /// With --sparsity: prune each weight matrix to the sparsity on its own (default: one
    /// threshold over all of them).
    #[arg(long, requires = "sparsity")]
    pub per_layer: bool,
    /// Keep this fraction (0 to 1] of the FFN neurons in every layer, the most important.
    #[arg(long, value_parser = probability)]
    pub ffn_keep: Option<f64>,
    /// With --ffn-keep: how neurons are ranked.
    #[arg(long, value_enum, default_value_t = Importance::Norm, requires = "ffn_keep")]
    pub importance: Importance,
    /// Training batches the gradient importance score sums over.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub importance_batches: usize,
    /// Remove these layers (0-based indices, comma-separated: 1,3).
    #[arg(long, value_delimiter = ',')]
    pub drop_layers: Option<Vec<usize>>,
    #[command(flatten)]
    pub training: TrainingArgs,
}

pub fn run(args: PruneArgs) -> Result<()> {
    args.training.print_summary(&prune(&args)?)
}

/// Prunes as `args` say and saves the model; returns a summary (the method, parameters and
/// sparsity before and after, `eval_before_<metric>` right after pruning and `eval_<metric>`
/// after recovery when there is an evaluation set, `output`).
pub fn prune(args: &PruneArgs) -> Result<serde_json::Value> {
    let files = args.model.resolve(args.training.run.json)?;
    match files.model_type()?.as_deref() {
        Some("bert") => prune_family::<BertForSequenceClassification>(args, &files),
        Some("gpt2") => prune_family::<GPT2LMHeadModel>(args, &files),
        other => bail!("{}: wick prune handles BERT classifiers and GPT-2 models, not model_type {other:?}", files.dir.display()),
    }
}

fn prune_family<M: Family>(args: &PruneArgs, files: &crate::weights::ModelFiles) -> Result<serde_json::Value> {
    let output = args.training.out.output.clone().context("prune needs --output DIR: the pruned model is saved there")?;
    let device = args.training.run.training_device()?;
    let sparsities = args.sparsity.as_deref().unwrap_or_default();
    for &s in sparsities {
        prune::check_sparsity(s)?;
    }
    let source = Checkpoint::<M>::read(files, &device)?;
    let data = args.training.data.is_some().then(|| M::datasets(&args.training, files, &source.config)).transpose()?;
    if sparsities.len() < 2 {
        return prune_once(args, files, &device, &source, data.as_ref(), sparsities.first().copied(), &output);
    }
    let mut runs = Vec::new();
    for &s in sparsities {
        let summary = prune_once(args, files, &device, &source, data.as_ref(), Some(s), &output.join(format!("sparsity-{s}")))?;
        if !args.training.run.json {
            eprintln!("{}", serde_json::to_string(&summary)?);
        }
        runs.push((s, summary));
    }
    sweep_report(&output, &args.model.model, &M::goal(&source.config).metric, &runs)
}

/// The sweep's table (`sweep.json`) and picture (`sweep.svg`, when the runs were evaluated):
/// `metric` after pruning and after recovery, against sparsity.
fn sweep_report(output: &std::path::Path, model: &str, metric: &str, runs: &[(f64, serde_json::Value)]) -> Result<serde_json::Value> {
    let series = |key: String| -> Vec<(f64, f64)> { runs.iter().filter_map(|(s, summary)| Some((*s, summary[&key].as_f64()?))).collect() };
    let (pruned, recovered) = (series(format!("eval_before_{metric}")), series(format!("eval_{metric}")));
    let picture = output.join("sweep.svg");
    let drawn = !(pruned.is_empty() && recovered.is_empty());
    if drawn {
        let lines = [(format!("{metric} after pruning"), pruned), (format!("{metric} after recovery"), recovered)];
        // A folder is named by its last part, as `wick serve` names it.
        let name = std::path::Path::new(model).file_name().filter(|_| std::path::Path::new(model).is_dir()).map_or(model.into(), |n| n.to_string_lossy());
        crate::train::plot::line_chart(&picture, &format!("{name}: magnitude pruning"), ("sparsity of the pruned weights", metric), &lines)?;
    }
    let summary = serde_json::json!({
        "sweep": runs.iter().map(|(_, s)| s).collect::<Vec<_>>(),
        "metric": metric,
        "picture": drawn.then(|| picture.display().to_string()),
    });
    crate::weights::write_atomically(&output.join("sweep.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}

/// Prunes `source` once (to `sparsity`, or as the other flags say), recovers it on `data` when
/// given, and saves it in `output`.
fn prune_once<M: Family>(args: &PruneArgs, files: &crate::weights::ModelFiles, device: &candle_core::Device, source: &Checkpoint<M>, data: Option<&(M::Data, Option<M::Data>)>, sparsity: Option<f64>, output: &std::path::Path) -> Result<serde_json::Value> {
    let (params_before, _) = weight_stats(&source.tensors)?;
    let mut masks = None;
    let (pruned, method) = if let Some(sparsity) = sparsity {
        let scope = if args.per_layer { Scope::PerMatrix } else { Scope::Global };
        let m = Masks::magnitude(source, sparsity, scope)?;
        let mut pruned = source.clone();
        m.apply_to_tensors(&mut pruned.tensors)?;
        masks = Some(m);
        (pruned, format!("magnitude pruning to {sparsity} sparsity ({scope:?})"))
    } else if let Some(keep) = args.ffn_keep {
        let size = M::ffn_size(&source.config);
        let count = prune::ffn_keep_count(size, keep)?;
        let scores = match args.importance {
            Importance::Norm => prune::ffn_norm_scores(source)?,
            Importance::Gradient => {
                let (train, _) = data.context("--importance gradient needs --data (the batches it scores on)")?;
                gradient_scores(source, train, args, device)?
            }
        };
        (prune::keep_ffn_neurons(source, count, &scores)?, format!("FFN neurons {size} → {count} per layer ({:?} importance)", args.importance))
    } else {
        let drop = args.drop_layers.as_deref().context("no pruning method")?;
        let total = M::num_layers(&source.config);
        let keep = layers::complement(total, drop)?;
        (layers::keep_layers(source, &keep)?, format!("layers {total} → {} (dropped {drop:?})", keep.len()))
    };
    if !args.training.run.json {
        eprintln!("{}: {method}", args.model.model);
    }
    let mut summary = serde_json::json!({ "method": method, "output": output });
    if let Some(sparsity) = sparsity {
        summary["sparsity"] = sparsity.into();
    }
    let pruned = match data {
        Some((train, eval)) => {
            let (model, varmap) = pruned.trainable(device)?;
            if let Some(eval) = eval {
                for (k, v) in recovery::evaluate(&model, eval, args.training.flags.eval_batch_size, device)? {
                    summary[format!("eval_before_{k}")] = v.into();
                }
            }
            let hook: Option<UpdateHook> = masks.clone().map(|m| Box::new(move |vars: &candle_nn::VarMap| m.apply_to_varmap(vars)) as UpdateHook);
            let mut training = args.training.clone();
            training.out.output = Some(output.to_path_buf());
            let (report, metrics) = recovery::fit(&model, &varmap, device, (train, eval.as_ref()), M::goal(&pruned.config), &training, hook)?;
            summary["recovery_steps"] = report.steps.into();
            summary["recovery_seconds"] = report.train_seconds.into();
            for (k, v) in metrics.unwrap_or_default() {
                summary[format!("eval_{k}")] = v.into();
            }
            Checkpoint::<M> { config: pruned.config, tensors: crate::train::checkpoint::varmap_tensors(&varmap)? }
        }
        None => pruned,
    };
    let (params_after, nonzero) = weight_stats(&pruned.tensors)?;
    summary["parameters_before"] = params_before.div_euclid(4).into();
    summary["parameters_after"] = params_after.div_euclid(4).into();
    summary["nonzero_parameters"] = nonzero.into();
    summary["sparsity_of_pruned_weights"] = prune::measured_sparsity::<M>(&pruned.tensors)?.into();
    pruned.save(output, Some(&files.dir))?;
    Ok(summary)
}

/// Michel et al.'s FFN scores on the first `--importance-batches` training batches, in order.
fn gradient_scores<M: Family>(source: &Checkpoint<M>, train: &M::Data, args: &PruneArgs, device: &candle_core::Device) -> Result<Vec<Vec<f32>>> {
    let (model, varmap) = source.trainable(device)?;
    let batching = Batching::sequential(args.training.flags.batch_size).epoch(train.len(), 0)?;
    let chosen: Vec<&Vec<usize>> = batching.iter().take(args.importance_batches).collect();
    let bar = crate::cmd::progress_bar(chosen.len(), "batches", args.training.run.json);
    let mut batches = Vec::new();
    for indices in chosen {
        batches.push(train.batch(indices, device)?);
        bar.inc(1);
    }
    let scores = prune::ffn_gradient_scores(&model, &varmap, M::num_layers(&source.config), &batches);
    bar.finish_and_clear();
    scores
}

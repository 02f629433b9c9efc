//! `wick train gpt2`: a small GPT-2 trained from scratch on a text file, nanoGPT-style, through
//! the shared Trainer, saved as a Hugging Face GPT-2 folder (`wick generate --model DIR` and
//! transformers' `GPT2LMHeadModel.from_pretrained(DIR)` both load it).

use crate::cli::{self, OutputArgs, RunArgs};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;
use crate::data::chars::TokenWindows;
use crate::generate::{self, GenerationConfig};
use crate::models::gpt2::{Config, GPT2LMHeadModel, TokenIds};
use crate::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

const DEFAULT_TOKENIZER: &str = "../shared/data/gpt2-tokenizer";

/// Train a GPT-2 language model from scratch on a text file (the last 10% is the validation set)
/// with GPT-2's byte-level BPE tokenizer, AdamW (no weight decay on biases and LayerNorms) and a
/// warmup + cosine learning-rate schedule; report validation loss and perplexity, save a Hugging
/// Face GPT-2 folder in --output (config.json, model.safetensors, tokenizer files, next to the
/// trainer's checkpoints/ and metrics), and print a sample.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct Gpt2Args {
    /// A plain-text corpus (e.g. tinyshakespeare's input.txt).
    #[arg(long)]
    pub data: PathBuf,
    /// Folder with a GPT-2 tokenizer (tokenizer.json, or vocab.json + merges.txt); default
    /// ../shared/data/gpt2-tokenizer. The vocabulary size of the model is the tokenizer's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4, value_parser = cli::at_least_one)]
    pub n_layer: usize,
    /// Width of the model (embedding and residual stream).
    #[arg(long, default_value_t = 192, value_parser = cli::at_least_one)]
    pub n_embd: usize,
    /// Attention heads per block (must divide --n-embd).
    #[arg(long, default_value_t = 6, value_parser = cli::at_least_one)]
    pub n_head: usize,
    /// Context length in tokens: training sequences and the model's n_positions.
    #[arg(long, default_value_t = 128, value_parser = cli::at_least_one)]
    pub block_size: usize,
    /// Dropout on embeddings, residual branches and attention probabilities (0 = off).
    #[arg(long, default_value_t = 0.0, value_parser = cli::fraction)]
    pub dropout: f64,
    /// Optimizer steps (the LR schedule spans them).
    #[arg(long, default_value_t = 2000, value_parser = cli::at_least_one)]
    pub steps: usize,
    /// Stop early, with a checkpoint, after this many minutes of training.
    #[arg(long, value_parser = cli::minutes)]
    pub minutes: Option<Duration>,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8, value_parser = cli::at_least_one)]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = cli::at_least_one)]
    pub grad_accum: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 1e-3, value_parser = cli::positive)]
    pub lr: f64,
    /// Linear warmup steps, then cosine decay to --min-lr-ratio of the peak.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Where the cosine decay ends, as a fraction of the peak learning rate.
    #[arg(long, default_value_t = 0.1, value_parser = cli::fraction)]
    pub min_lr_ratio: f64,
    /// AdamW weight decay (not applied to biases and LayerNorm parameters).
    #[arg(long, default_value_t = 0.1, value_parser = cli::non_negative)]
    pub weight_decay: f64,
    /// AdamW's beta2 (0.95 as nanoGPT's GPT-2 runs; PyTorch's default is 0.999).
    #[arg(long, default_value_t = 0.95, value_parser = cli::fraction)]
    pub beta2: f64,
    /// Clip the gradients' global norm to this value (0 = no clipping).
    #[arg(long = "max-grad-norm", alias = "clip", value_name = "NORM", default_value_t = 1.0, value_parser = cli::non_negative)]
    pub clip: f64,
    /// Evaluate on (part of) the validation set every N steps.
    #[arg(long, default_value_t = 200, value_parser = cli::at_least_one)]
    pub eval_every: usize,
    /// Validation batches per periodic evaluation (the final one uses the whole set).
    #[arg(long, default_value_t = 16, value_parser = cli::at_least_one)]
    pub eval_batches: usize,
    /// Tokens to sample after training.
    #[arg(long, default_value_t = 200)]
    pub sample_tokens: usize,
    /// Text the sample starts from.
    #[arg(long, default_value = "ROMEO:")]
    pub prompt: String,
    /// Sampling temperature of the sample (0 = greedy).
    #[arg(long, default_value_t = 0.8, value_parser = cli::non_negative)]
    pub temperature: f64,
    /// Sample among the K most likely tokens.
    #[arg(long, default_value_t = 200)]
    pub top_k: usize,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Writes the `tokenizer_config.json` transformers reads when the tokenizer folder had none.
fn write_tokenizer_config(to: &Path, block_size: usize, eos: &str) -> Result<()> {
    if !to.join("tokenizer_config.json").is_file() {
        let config = serde_json::json!({
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": eos, "eos_token": eos, "unk_token": eos,
            "add_prefix_space": false,
            "model_max_length": block_size,
        });
        std::fs::write(to.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    }
    Ok(())
}

pub fn run(args: Gpt2Args) -> Result<()> {
    let device = args.run.training_device()?;
    let tokenizer_dir = match &args.tokenizer {
        Some(d) => d.clone(),
        None if Path::new(DEFAULT_TOKENIZER).is_dir() => PathBuf::from(DEFAULT_TOKENIZER),
        None => bail!("no --tokenizer given and {DEFAULT_TOKENIZER} does not exist: give a folder with GPT-2's tokenizer files"),
    };
    let tokenizer = crate::tokenizer::load(&tokenizer_dir)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let eos_text = "<|endoftext|>";
    let eos = tokenizer.token_to_id(eos_text).with_context(|| format!("{}: no {eos_text} token", tokenizer_dir.display()))?;

    let text = std::fs::read_to_string(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the corpus is empty", args.data.display());
    }
    let t0 = std::time::Instant::now();
    let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing the corpus: {e}"))?.get_ids().to_vec();
    let cut = ids.len() - ids.len() / 10;
    let (train_ids, val_ids) = (ids[..cut].to_vec(), ids[cut..].to_vec());
    eprintln!("{} characters → {} tokens ({:.1} s); {} for training, {} for validation; vocabulary {vocab_size}", text.len(), ids.len(), t0.elapsed().as_secs_f64(), train_ids.len(), val_ids.len());
    let data = args.data.display();
    let train = TokenWindows::new(train_ids, args.block_size).with_context(|| format!("{data}: the training part (90%) is too short for --block-size {}", args.block_size))?;
    let val = TokenWindows::new(val_ids, args.block_size).with_context(|| format!("{data}: the validation part (10%) is too short for --block-size {}", args.block_size))?;

    let mut cfg = Config::new(vocab_size, args.block_size, args.n_embd, args.n_layer, args.n_head);
    cfg.resid_pdrop = args.dropout;
    cfg.embd_pdrop = args.dropout;
    cfg.attn_pdrop = args.dropout;
    cfg.bos_token_id = Some(TokenIds::One(eos));
    cfg.eos_token_id = Some(TokenIds::One(eos));
    cfg.check()?;
    let varmap = VarMap::new();
    let vb = crate::nn::var_builder(&varmap, DType::F32, &device, args.run.seed);
    let model = GPT2LMHeadModel::load(vb, &cfg)?;
    let params = optim::params(&varmap, optim::is_bias_or_norm);
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    eprintln!("GPT-2 with {} layers, n_embd {}, {} heads, context {}: {:.2} M parameters", args.n_layer, args.n_embd, args.n_head, args.block_size, n_params as f64 / 1e6);
    let optimizer = OptimizerConfig::AdamW { beta1: 0.9, beta2: args.beta2, eps: 1e-8, weight_decay: args.weight_decay };
    let config = TrainerConfig {
        epochs: usize::MAX,
        max_steps: Some(args.steps),
        time_limit: args.minutes,
        batch_size: args.batch_size,
        eval_batch_size: args.batch_size,
        drop_last: true,
        grad_accum: args.grad_accum,
        lr: args.lr,
        schedule: Schedule::CosineWarmup { warmup: args.warmup, min_ratio: args.min_lr_ratio },
        max_grad_norm: (args.clip > 0.0).then_some(args.clip),
        eval_every: Some(args.eval_every),
        eval_each_epoch: false,
        max_eval_batches: Some(args.eval_batches),
        save_each_epoch: false,
        goal: Some(MetricGoal::minimize("loss")),
        log_every: 10,
        ..args.out.trainer_config(&args.run)
    };
    let mut trainer = Trainer::new(config, varmap.clone(), optimizer.build(params)?, device.clone());
    let report = trainer.fit(&model, &train, Some(&val))?;
    let val_metrics = trainer.evaluate(&model, &val)?;
    let (val_loss, val_ppl) = (val_metrics["loss"], val_metrics["perplexity"]);

    // The trained weights as plain tensors: export, and sample without building autograd graphs.
    let tensors = crate::train::checkpoint::varmap_tensors(&varmap)?;
    let inference = match args.out.model_dir() {
        Some(dir) => {
            crate::pretrained::save::<GPT2LMHeadModel>(dir, &cfg, tensors, Some(&tokenizer_dir))?;
            write_tokenizer_config(dir, args.block_size, eos_text)?;
            eprintln!("saved a Hugging Face GPT-2 folder in {} (wick generate --model {0}; GPT2LMHeadModel.from_pretrained)", dir.display());
            crate::pretrained::load::<GPT2LMHeadModel>(&crate::weights::ModelFiles::from_dir(dir)?, DType::F32, &device)?.0
        }
        None => {
            eprintln!("no --output: the model is not saved");
            GPT2LMHeadModel::load(crate::weights::inference_var_builder(tensors, DType::F32, &device), &cfg)?
        }
    };
    let gen = GenerationConfig {
        max_new_tokens: args.sample_tokens.min(args.block_size.saturating_sub(16)),
        temperature: args.temperature,
        top_k: Some(args.top_k),
        eos_token_ids: vec![],
        pad_token_id: eos,
        seed: args.run.seed,
        ..Default::default()
    };
    let mut prompt_ids = generate::encode_prompts(&tokenizer, &[args.prompt.as_str()])?;
    if prompt_ids[0].is_empty() {
        prompt_ids[0].push(eos);
    }
    prompt_ids[0].truncate(16);
    let out = generate::generate(&inference, &prompt_ids, &gen, Some(&tokenizer), None)?;
    let sample = format!("{}{}", tokenizer.decode(&prompt_ids[0], true).unwrap_or_default(), out.texts[0]);
    if !args.run.json {
        println!("{sample}");
    }
    let tokens_per_step = (args.batch_size * args.grad_accum * args.block_size) as f64;
    let summary = serde_json::json!({
        "parameters": n_params,
        "steps": report.steps,
        "val_loss": val_loss,
        "val_perplexity": val_ppl,
        "train_tokens_per_s": report.samples_per_s * args.block_size as f64,
        "tokens_seen": report.steps as f64 * tokens_per_step,
        "seconds": report.train_seconds,
        "sample": sample,
        "sample_tokens_per_s": out.tokens_per_s,
        "device": crate::device::device_name(&device),
        "output": args.out.output,
    });
    if args.run.json {
        println!("{summary}");
    } else {
        eprintln!(
            "validation loss {val_loss:.4} nats/token (perplexity {val_ppl:.1}) after {} steps ({:.0} s, {:.0} tokens/s)",
            report.steps,
            report.train_seconds,
            report.samples_per_s * args.block_size as f64
        );
    }
    Ok(())
}

#!/usr/bin/env python3
"""Fine-tune a BERT checkpoint on GLUE SST-2 with transformers' Trainer: the PyTorch
baseline for wick's BERT fine-tuning (same data, schedule and hyper-parameters).

  * AutoModelForSequenceClassification.from_pretrained(--model, num_labels from the
    training labels); a fresh classifier head is seeded with --seed
  * AdamW (Trainer's default optimizer, --optim), weight decay --weight-decay (Trainer
    excludes biases and LayerNorm weights), linear schedule with warmup
    ceil(--warmup-ratio * total_steps) steps, no gradient clipping change (Trainer's
    default max_grad_norm 1.0, see --max-grad-norm)
  * dynamic padding (DataCollatorWithPadding), truncation at --max-len, shuffled
    batches of --batch-size, float32, CPU, torch.set_num_threads(--threads)
  * the tokenizer's own padding/truncation settings in tokenizer.json are switched off
    (all-MiniLM-L6-v2's pads every sentence to 128), so batches pad to their longest row
  * one evaluation on --eval at the end

Data: GLUE SST-2 TSV with a header `sentence<TAB>label` (sentences end with a space).
--max-train-examples N keeps the FIRST N rows of --train.

Prints one JSON line:
  {"impl": "pytorch-transformers", "eval_accuracy", "eval_loss", "train_loss",
   "train_samples_per_s", "seconds" (train wall time), "train_examples", "eval_examples",
   "steps", "settings": {...}}

    python3 -m venv venv && venv/bin/pip install torch transformers safetensors sentence-transformers accelerate
    venv/bin/python scripts/bert_finetune_transformers.py --model ../shared/data/all-MiniLM-L6-v2 \\
        --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv --max-train-examples 2000
"""

import argparse
import json
import math
import os
import tempfile
import time

import torch


def read_tsv(path, limit=None):
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header[:2] == ["sentence", "label"], f"unexpected header {header} in {path}"
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            sent, label = line.rsplit("\t", 1)
            texts.append(sent)
            labels.append(int(label))
            if limit is not None and len(texts) >= limit:
                break
    return texts, labels


class Encoded(torch.utils.data.Dataset):
    def __init__(self, enc, labels):
        self.enc, self.labels = enc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--max-train-examples", type=int, default=None)
    ap.add_argument("--max-eval-examples", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--optim", default="adamw_torch", help="Trainer optim name (adamw_torch, adamw_torch_fused, ...)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(args.seed)

    tr_x, tr_y = read_tsv(args.train, args.max_train_examples)
    ev_x, ev_y = read_tsv(args.eval, args.max_eval_examples)
    num_labels = max(tr_y) + 1

    tok = AutoTokenizer.from_pretrained(args.model)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None:  # drop tokenizer.json's fixed padding / truncation
        backend.no_padding()
        backend.no_truncation()
    enc_tr = tok(tr_x, truncation=True, max_length=args.max_len, padding=False)
    enc_ev = tok(ev_x, truncation=True, max_length=args.max_len, padding=False)
    lens = [len(x) for x in enc_tr["input_ids"]]
    assert max(lens) <= args.max_len and len(set(lens)) > 1, "tokenizer still pads to a fixed length"

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)

    steps_per_epoch = math.ceil(len(tr_y) / args.batch_size)
    total_steps = math.ceil(steps_per_epoch * args.epochs)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.eval_batch_size,
            learning_rate=args.lr, weight_decay=args.weight_decay,
            lr_scheduler_type="linear", warmup_steps=warmup_steps,
            max_grad_norm=args.max_grad_norm, optim=args.optim,
            seed=args.seed, use_cpu=True, fp16=False, bf16=False,
            eval_strategy="no", save_strategy="no", logging_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0)

        def accuracy(p):
            preds = p.predictions.argmax(-1)
            return {"accuracy": float((preds == p.label_ids).mean())}

        trainer = Trainer(model=model, args=targs,
                          train_dataset=Encoded(enc_tr, tr_y), eval_dataset=Encoded(enc_ev, ev_y),
                          data_collator=DataCollatorWithPadding(tok),
                          compute_metrics=accuracy)
        # keep stdout to our single JSON line (PrinterCallback prints the log dicts)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
        t0 = time.perf_counter()
        tr = trainer.train()
        seconds = time.perf_counter() - t0
        ev = trainer.evaluate()

    print(json.dumps({
        "impl": "pytorch-transformers",
        "eval_accuracy": ev["eval_accuracy"],
        "eval_loss": ev["eval_loss"],
        "train_loss": tr.training_loss,
        "train_samples_per_s": len(tr_y) * args.epochs / seconds,
        "seconds": seconds,
        "train_examples": len(tr_y),
        "eval_examples": len(ev_y),
        "steps": tr.global_step,
        "settings": {
            "model": os.path.basename(os.path.normpath(args.model)),
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "warmup_ratio": args.warmup_ratio, "warmup_steps": warmup_steps,
            "max_len": args.max_len, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "optim": args.optim,
            "num_labels": num_labels, "seed": args.seed, "threads": args.threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
        },
    }))


if __name__ == "__main__":
    main()

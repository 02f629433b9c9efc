#!/usr/bin/env python3
"""PyTorch / transformers BERT speed reference for wick's BERT benches.

Random-weight transformers models (float32), random token ids, no padding (all-ones
attention mask), attn_implementation="sdpa" (transformers' default; pass --attn eager
to compare):

  bert_base_forward_b8_s128  BertModel, BERT-base shape (hidden 768, 12 layers, 12 heads,
                             intermediate 3072, vocab 30522), eval + no_grad, batch 8 x 128
  bert_base_train_b8_s128    BertForSequenceClassification (2 labels), same shape, train
                             mode (default dropout 0.1), one full step: zero_grad, forward,
                             cross-entropy, backward, AdamW(lr 5e-5, wd 0.01) step
  bert_base_forward_b8_s128_q8_0  the same forward after torch.ao.quantization.quantize_dynamic
                             (int8 weights of every nn.Linear, activations quantized per call)
  minilm_train_b32_s64       the same train step, MiniLM-L6 shape (hidden 384, 6 layers,
                             12 heads, intermediate 1536, vocab 30522), batch 32 x 64

Each: --warmup untimed runs, then the median of --iters timed runs. Prints one JSON line
per bench on stdout:
  {"bench": "bert_base_forward_b8_s128", "impl": "pytorch", "threads": 2, "ms": ...,
   "seq_per_s": ..., "attn": "sdpa", "device": "cpu", "iters": ...}
The torch/transformers versions, load average and OMP_WAIT_POLICY go to stderr (see
scripts/bench_pytorch.py: with competing processes OMP threads spin; set
OMP_WAIT_POLICY=PASSIVE in the environment, and measure on an idle machine).
--tiny shrinks every shape (for testing the script only; bench names get a "tiny_" prefix).

    python3 -m venv venv && venv/bin/pip install torch transformers safetensors sentence-transformers
    venv/bin/python scripts/bench_bert.py [--threads 2] [--which all|base_forward|base_train|minilm_train]
                                          [--only BENCH_NAME[,BENCH_NAME...]]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_setup  # noqa: E402

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, vocab_size=30522)
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, vocab_size=30522)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, vocab_size=1000)

BENCHES = {
    # which: (bench name, shape, batch, seq, train?)
    "base_forward": ("bert_base_forward_b8_s128", BASE, 8, 128, False),
    # int8 dynamic quantization of every nn.Linear: what a PyTorch user does for a quantized
    # CPU forward (wick's twin is q8_0); CPU only
    "base_forward_q8": ("bert_base_forward_b8_s128_q8_0", BASE, 8, 128, False),
    "base_train": ("bert_base_train_b8_s128", BASE, 8, 128, True),
    "minilm_train": ("minilm_train_b32_s64", MINILM, 32, 64, True),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_bench(name, shape, batch, seq, train, args):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(**shape, max_position_embeddings=512, num_labels=2,
                     attn_implementation=args.attn)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=args.device)
    mask = torch.ones_like(ids)
    tt = torch.zeros_like(ids)
    if train:
        model = BertForSequenceClassification(cfg).to(args.device).train()
        labels = torch.randint(0, 2, (batch,), device=args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss
            loss.backward()
            opt.step()
    else:
        model = BertModel(cfg).to(args.device).eval()
        if name.endswith("_q8_0"):
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

        def step():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, token_type_ids=tt)

    assert model.config._attn_implementation == args.attn, model.config._attn_implementation
    for _ in range(args.warmup):
        step()
    sync(args.device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"bench": name, "impl": "pytorch", "threads": args.threads, "ms": round(ms, 3),
            "seq_per_s": round(batch / (ms / 1e3), 3), "attn": args.attn,
            "device": args.device, "iters": args.iters}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--which", default="all", choices=["all"] + list(BENCHES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", help="bench names, comma-separated (as wick's bench takes them)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, to test the script")
    args = ap.parse_args()

    torch_setup.setup(args.threads)
    which = list(BENCHES) if args.which == "all" else [args.which]
    if args.only:
        which = [w for w in which if BENCHES[w][0] in args.only.split(",")]
    if args.device != "cpu":
        which = [w for w in which if not BENCHES[w][0].endswith("_q8_0")]
    for w in which:
        name, shape, batch, seq, train = BENCHES[w]
        if args.tiny:
            name, shape, batch, seq = "tiny_" + name, TINY, 2, 16
        print(json.dumps(run_bench(name, shape, batch, seq, train, args)), flush=True)


if __name__ == "__main__":
    main()

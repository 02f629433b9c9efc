#!/usr/bin/env python3
"""PyTorch training-throughput reference for wick's benches.

Runs the same three workloads as wick's Rust benches, each as a full training step
(zero_grad, forward, loss, backward, optimizer step) on synthetic float32 data
generated once:

  mlp    MLP 784-512-256-10 (ReLU), batch 128, cross-entropy, Adam(lr=1e-3)
  lenet  LeNet-5 (as in tests/fixtures/make_fixtures.py) on (128,1,28,28),
         cross-entropy, Adam(lr=1e-3)
  lstm   char LM: Embedding(65,64) -> LSTM(64,256,1 layer,batch_first) ->
         Linear(256,65), batch 32, seq 100, cross-entropy over all positions,
         Adam(lr=2e-3)

Prints one JSON object per workload on stdout, e.g.
  {"name": "mlp", "framework": "pytorch", "threads": 2, "device": "cpu",
   "samples_per_s": ..., "step_ms": ..., "steps": ...}
where samples = batch items (sequences for lstm). The torch version goes to stderr.

Measure on an otherwise idle machine. PyTorch's OpenMP threads spin-wait by
default, so when other processes compete for the cores (e.g. a cargo build) the
--threads 2 numbers can collapse by 10-50x; OMP_WAIT_POLICY=PASSIVE (must be set
in the environment before Python starts) largely avoids that. The stderr line
reports the load average and OMP_WAIT_POLICY so polluted runs are recognisable.

Deps: python3 -m venv ~/wick-ref && ~/wick-ref/bin/pip install torch
Usage: python scripts/bench_pytorch.py [--threads 2] [--warmup 5] [--seconds 10]
                                       [--only mlp|lenet|lstm] [--device cpu|cuda]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# MLP / LeNet are shared with the fixture generator (importing it has no side effects).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir, "tests", "fixtures"))
from make_fixtures import LeNet, MLP  # noqa: E402

MIN_STEPS = 10


class CharLSTM(nn.Module):
    def __init__(self, vocab=65, emb=64, hidden=256):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        out, _ = self.rnn(self.embedding(ids))
        return self.head(out)


def make_workload(name, device):
    """Returns (model, optimizer, inputs, targets, batch_size, loss_fn)."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        model, bs = MLP((784, 512, 256, 10)), 128
        x = torch.randn(bs, 784, generator=g)
        y = torch.randint(0, 10, (bs,), generator=g)
        lr = 1e-3
    elif name == "lenet":
        model, bs = LeNet(), 128
        x = torch.randn(bs, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (bs,), generator=g)
        lr = 1e-3
    elif name == "lstm":
        model, bs = CharLSTM(), 32
        x = torch.randint(0, 65, (bs, 100), generator=g)
        y = torch.randint(0, 65, (bs, 100), generator=g)
        lr = 2e-3
    else:
        raise ValueError(name)
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return model, opt, x, y, bs, loss_fn


def bench(name, args):
    device = torch.device(args.device)
    model, opt, x, y, bs, loss_fn = make_workload(name, device)
    model.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    sync()

    steps = 0
    t0 = time.perf_counter()
    while True:
        step()
        steps += 1
        if steps >= MIN_STEPS:
            sync()
            if time.perf_counter() - t0 >= args.seconds:
                break
    sync()
    elapsed = time.perf_counter() - t0
    return {
        "name": name,
        "framework": "pytorch",
        "threads": args.threads,
        "device": args.device,
        "samples_per_s": steps * bs / elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "steps": steps,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warmup steps (default 5)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help=f"minimum timed seconds per workload (default 10; at least {MIN_STEPS} steps)")
    p.add_argument("--only", choices=["mlp", "lenet", "lstm"], help="run a single workload")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch.cuda.is_available() is False")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__} (threads={torch.get_num_threads()}, device={args.device}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, loadavg={load}, "
          f"cpus={os.cpu_count()})", file=sys.stderr)

    for name in [args.only] if args.only else ["mlp", "lenet", "lstm"]:
        print(json.dumps(bench(name, args)), flush=True)


if __name__ == "__main__":
    main()

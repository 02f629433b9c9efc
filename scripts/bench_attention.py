#!/usr/bin/env python3
"""PyTorch's torch.nn.functional.scaled_dot_product_attention at the shapes of wick's
`benches/attention.rs`; scripts/bench_attention.sh runs both and prints the ratios.

One JSON object a line on stdout, with the same keys as the Rust bench:
  {"framework": "pytorch", "impl": "sdpa", "device": "cpu", "threads": 2, "dtype": "f32",
   "batch": 1, "heads": 12, "seq": 1024, "head_dim": 64, "causal": false, "backward": false,
   "ms": (median), "min_ms": ..., "runs": ..., "tflops": ...}

Causal uses is_causal=True (q_len == kv_len here, so top-left and bottom-right alignment agree).
With --backward the time is forward + backward of sum(out * w) w.r.t. q (k, v need grads too).

Deps: python3 -m venv venv && venv/bin/pip install torch
Usage: python scripts/bench_attention.py [--threads 2] [--seconds 2] [--seqs 256,1024,4096]
          [--head-dims 64] [--batch 1] [--heads 12] [--dtype f32|f16|bf16] [--device cpu|cuda]
          [--backward]
Measure on an otherwise idle machine (OMP_WAIT_POLICY=PASSIVE helps when it is not).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def flops(b, h, s, d, causal, backward):
    pairs = s * (s + 1) / 2 if causal else s * s
    f = 4.0 * b * h * d * pairs
    return f * 3.5 if backward else f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--seqs", default="256,1024,4096")
    ap.add_argument("--head-dims", default="64")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dtype", default="f32", choices=DTYPES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backward", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dt = DTYPES[a.dtype]
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}", file=sys.stderr)
    torch.manual_seed(0)
    for d in map(int, a.head_dims.split(",")):
        for s in map(int, a.seqs.split(",")):
            for causal in (False, True):
                shape = (a.batch, a.heads, s, d)
                q, k, v, w = (torch.randn(shape, device=dev, dtype=dt) for _ in range(4))
                if a.backward:
                    for t in (q, k, v):
                        t.requires_grad_(True)
                scale = 1.0 / d**0.5

                def run():
                    if a.backward:
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
                        (g,) = torch.autograd.grad((o * w).sum(), (q,))
                        return g
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

                run()
                sync()
                times = []
                start = time.perf_counter()
                while len(times) < 3 or (time.perf_counter() - start < a.seconds and len(times) < 1000):
                    t = time.perf_counter()
                    run()
                    sync()
                    times.append(time.perf_counter() - t)
                times.sort()
                med = times[len(times) // 2]
                print(json.dumps({
                    "framework": "pytorch", "impl": "sdpa", "device": a.device, "threads": a.threads,
                    "dtype": a.dtype, "batch": a.batch, "heads": a.heads, "seq": s, "head_dim": d,
                    "causal": causal, "backward": a.backward, "ms": med * 1e3, "min_ms": times[0] * 1e3,
                    "runs": len(times), "tflops": flops(a.batch, a.heads, s, d, causal, a.backward) / med / 1e12,
                }), flush=True)


if __name__ == "__main__":
    main()

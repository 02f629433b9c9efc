#!/usr/bin/env python3
"""wick's fused attention against torch.nn.functional.scaled_dot_product_attention, on any device
the wick bench binary was built for (run by scripts/gpu-attention-check.sh on a GPU machine).

Writes random cases (f32 and bf16; causal and not; padding masks; q_len 1; q_len != kv_len;
head_dim 32/64/128) to a safetensors file, runs `BENCH_BIN --check IN OUT --device DEV`
(benches/attention.rs: wick's fused_attention forward and the gradients of sum(out * w)), and
compares with SDPA computed in float64 on the same (rounded) inputs:

  f32:  output max|diff| <= 1e-5 * max(1, max|ref|), gradients 1e-4
  bf16: output 1e-2, gradients 2e-2 (wick's output is rounded to bf16)

wick's causal mask is bottom-right aligned (query i sees key j iff j <= i + kv_len - q_len); it is
passed to SDPA as an explicit boolean mask. Exit status 1 if any check fails.

Deps: python3 -m venv venv && venv/bin/pip install torch safetensors
Usage: python scripts/attention_check.py --bench-bin PATH [--device cuda] [--workdir DIR]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# (batch, heads, q_len, kv_len, head_dim, causal, valid lengths per batch entry or None)
CASES = [
    (2, 8, 512, 512, 64, True, None),
    (2, 8, 1000, 1000, 128, False, [1000, 700]),
    (1, 4, 1, 777, 64, True, None),
    (2, 4, 300, 1030, 32, True, [1030, 500]),
    (1, 8, 2048, 2048, 128, True, None),
    (3, 2, 77, 77, 64, False, [77, 40, 1]),
]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
TOL = {"f32": (1e-5, 1e-4), "bf16": (1e-2, 2e-2)}


def allowed_mask(b, lq, lk, causal, lens):
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if lens is not None:
        allowed &= (torch.arange(lk)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    if causal:
        allowed &= (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq))[None, None]
    assert allowed.any(-1).all(), "a query row sees no key"
    return allowed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-bin", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    ref_dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workdir = a.workdir or tempfile.mkdtemp(prefix="wick-attn-")
    failed = 0
    for name, dt in DTYPES.items():
        torch.manual_seed(0)
        tensors, flags = {}, []
        for i, (b, h, lq, lk, d, causal, lens) in enumerate(CASES):
            p = f"case{i}."
            tensors[p + "q"] = torch.randn(b, h, lq, d).to(dt)
            tensors[p + "k"] = torch.randn(b, h, lk, d).to(dt)
            tensors[p + "v"] = torch.randn(b, h, lk, d).to(dt)
            tensors[p + "w"] = torch.randn(b, h, lq, d).to(dt)
            tensors[p + "scale"] = torch.tensor([d ** -0.5], dtype=torch.float32)
            if lens is not None:
                tensors[p + "mask"] = (torch.arange(lk)[None, :] < torch.tensor(lens)[:, None]).long()
            flags.append([int(causal), int(lens is not None)])
        tensors["cases"] = torch.tensor(flags, dtype=torch.int64)
        inp, out = os.path.join(workdir, f"in_{name}.safetensors"), os.path.join(workdir, f"out_{name}.safetensors")
        save_file(tensors, inp)
        subprocess.run([a.bench_bin, "--check", inp, out, "--device", a.device], check=True)
        ours = load_file(out)
        tol_out, tol_grad = TOL[name]
        for i, (b, h, lq, lk, d, causal, lens) in enumerate(CASES):
            p = f"case{i}."
            q, k, v, w = (tensors[p + n].to(ref_dev, torch.float64).requires_grad_(n != "w") for n in "qkvw")
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_mask(b, lq, lk, causal, lens).to(ref_dev),
                                               scale=d ** -0.5)
            (o * w).sum().backward()
            for key, ref, tol in [("out", o, tol_out), ("grad_q", q.grad, tol_grad), ("grad_k", k.grad, tol_grad),
                                  ("grad_v", v.grad, tol_grad)]:
                got = ours[p + key].to(ref_dev, torch.float64)
                ref = ref.detach()
                err = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
                ok = err <= tol
                failed += not ok
                print(f"{name:4} case {i} {str((b, h, lq, lk, d)):24} causal={int(causal)} mask={int(lens is not None)} "
                      f"{key:6} rel err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
    print("all checks passed" if not failed else f"{failed} checks FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

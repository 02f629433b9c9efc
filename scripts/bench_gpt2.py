#!/usr/bin/env python3
"""PyTorch / transformers GPT-2 greedy-decoding speed reference for wick's GPT-2 bench.

GPT2LMHeadModel with random weights of GPT-2-small shape (n_embd 768, 12 layers,
12 heads, vocab 50257, n_positions 1024, tied lm_head), eval mode, greedy decoding of
--batch rows (default 1; rows of the same length, so no padding): 16-token random prompts,
exactly 128 new tokens per row
(model.generate(do_sample=False, min_new_tokens=128, max_new_tokens=128), KV cache on,
default DynamicCache, attn_implementation "sdpa").

One untimed warmup generate, then --runs timed generate calls; tokens_per_s =
batch * 128 / median wall time of the generate call (prefill included). Prints one JSON line:
  {"bench": "gpt2_greedy_b1_p16_n128", "impl": "pytorch", "dtype": "f32", "batch": 1,
   "threads": 2, "tokens_per_s": ..., "ms_per_token": ..., "device": "cpu"}
Versions, load average and OMP_WAIT_POLICY go to stderr (see scripts/bench_pytorch.py:
measure on an idle machine, OMP_WAIT_POLICY=PASSIVE when sharing cores).
--tiny uses a 2-layer n_embd-64 model (to test the script only).

    python3 -m venv venv && venv/bin/pip install torch transformers safetensors sentence-transformers
    venv/bin/python scripts/bench_gpt2.py [--threads 2] [--dtype f32|bf16|f16] [--batch 8]
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

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=list(DTYPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    torch_setup.setup(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = (dict(n_embd=64, n_layer=2, n_head=4) if args.tiny
             else dict(n_embd=768, n_layer=12, n_head=12))
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, **shape,
                     bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    prompt = torch.randint(0, 50256, (args.batch, args.prompt_len), device=args.device)
    mask = torch.ones_like(prompt)
    n = args.new_tokens

    def gen():
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=False,
                                 min_new_tokens=n, max_new_tokens=n, use_cache=True,
                                 pad_token_id=50256)
        if args.device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt_len + n, out.shape
        return out

    gen()  # warmup
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        gen()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    name = f"gpt2_greedy_b{args.batch}_p{args.prompt_len}_n{n}"
    tokens = args.batch * n
    print(json.dumps({"bench": ("tiny_" if args.tiny else "") + name, "impl": "pytorch",
                      "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
                      "tokens_per_s": round(tokens / t, 3), "ms_per_token": round(t / tokens * 1e3, 3),
                      "device": args.device, "runs": args.runs}))


if __name__ == "__main__":
    main()

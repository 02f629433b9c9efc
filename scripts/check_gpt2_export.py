#!/usr/bin/env python3
"""Check a GPT-2 folder saved by wick (wick train gpt2) against transformers.

Loads DIR unchanged with AutoTokenizer + GPT2LMHeadModel.from_pretrained (eval, float32, CPU),
then, for the prompt:
  * tokenizes it and checks the ids equal wick's (from the --save-logits file),
  * computes the prompt's logits and compares them with wick's (max abs difference <= --tol),
  * runs greedy generation (--new-tokens, no EOS stop) and, given wick's --json output, checks the
    generated ids are identical.

    cargo run --release -- generate --model DIR --prompt "ROMEO:" --temperature 0 \
        --max-new-tokens 20 --ignore-eos --save-logits /tmp/wick_logits.safetensors --json > /tmp/wick.json
    venv/bin/python scripts/check_gpt2_export.py DIR --prompt "ROMEO:" \
        --wick-logits /tmp/wick_logits.safetensors --wick-json /tmp/wick.json

Prints one JSON line {"ok", "max_abs_diff_logits", "ids_equal", "greedy_equal", ...}; exits 1 on a
mismatch.
"""

import argparse
import json
import sys

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--wick-logits", required=True, help="safetensors file from wick generate --save-logits")
    ap.add_argument("--wick-json", help="wick generate --json output (its last line is used)")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(args.dir)
    model = GPT2LMHeadModel.from_pretrained(args.dir).eval()
    ids = torch.tensor([tok(args.prompt)["input_ids"]], dtype=torch.int64)
    wick = load_file(args.wick_logits)
    ids_equal = torch.equal(ids, wick["input_ids"].to(torch.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    diff = (logits - wick["logits"]).abs().max().item() if logits.shape == wick["logits"].shape else float("inf")
    result = {"dir": args.dir, "ids_equal": ids_equal, "max_abs_diff_logits": diff,
              "max_abs_logit": logits.abs().max().item(), "vocab": logits.shape[-1], "tokens": ids.shape[1]}
    ok = ids_equal and diff <= args.tol
    if args.wick_json:
        with open(args.wick_json) as f:
            w = json.loads([l for l in f.read().splitlines() if l.strip()][-1])
        n = len(w["generated_ids"])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.eos_token_id)
        hf_ids = out[0, ids.shape[1]:].tolist()
        result["greedy_equal"] = hf_ids == w["generated_ids"]
        result["greedy_tokens"] = n
        ok = ok and result["greedy_equal"]
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

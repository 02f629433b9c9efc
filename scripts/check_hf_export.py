#!/usr/bin/env python3
"""Check a wick-exported Hugging Face folder against transformers.

Loads DIR unchanged with AutoTokenizer + AutoModelForSequenceClassification, computes
the logits of the given texts (one padded batch, eval mode, float32, CPU) and compares
them with wick's predict output JSON:

    {"labels": ["positive", ...], "probs": [[...], ...], "logits": [[...], ...]}

("labels" may be label names or integer ids.) Prints one JSON line
{"ok", "max_abs_diff_logits", "max_abs_diff_probs", "label_agreement", "n", ...}
and exits 1 if any logit differs by more than --tol (default 1e-4), 2 on a shape or
count mismatch.

    python3 -m venv venv && venv/bin/pip install torch transformers safetensors sentence-transformers
    venv/bin/python scripts/check_hf_export.py DIR --wick-json pred.json --text "great film" --text "dull"
"""

import argparse
import json
import sys

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--wick-json", required=True, help="wick predict output (a file, or - for stdin)")
    ap.add_argument("--text", action="append", required=True, help="repeat for several texts")
    ap.add_argument("--text-pair", action="append", default=None,
                    help="optional second segment per text (repeat as often as --text)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.dir).eval()
    kw = dict(padding=True, return_tensors="pt")
    if args.max_length:
        kw.update(truncation=True, max_length=args.max_length)
    if args.text_pair:
        assert len(args.text_pair) == len(args.text), "one --text-pair per --text"
        batch = tok(args.text, args.text_pair, **kw)
    else:
        batch = tok(args.text, **kw)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    probs = logits.softmax(-1)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    hf_ids = logits.argmax(-1).tolist()

    wick = json.load(sys.stdin if args.wick_json == "-" else open(args.wick_json))
    result = {"dir": args.dir, "n": len(args.text), "tol": args.tol}
    try:
        w_logits = torch.tensor(wick["logits"], dtype=torch.float32)
        if w_logits.shape != logits.shape:
            raise ValueError(f"logits shape {list(w_logits.shape)} != transformers {list(logits.shape)}")
        diff = (w_logits - logits).abs().max().item()
        result["max_abs_diff_logits"] = diff
        if "probs" in wick:
            w_probs = torch.tensor(wick["probs"], dtype=torch.float32)
            if w_probs.shape != probs.shape:
                raise ValueError(f"probs shape {list(w_probs.shape)} != {list(probs.shape)}")
            result["max_abs_diff_probs"] = (w_probs - probs).abs().max().item()
        if "labels" in wick:
            w_labels = wick["labels"]
            if len(w_labels) != len(hf_ids):
                raise ValueError(f"{len(w_labels)} labels for {len(hf_ids)} texts")
            agree = 0
            for w, i in zip(w_labels, hf_ids):
                agree += int(w == i or w == id2label.get(i) or str(w) == str(i))
            result["label_agreement"] = agree / len(hf_ids)
        result["hf_labels"] = [id2label.get(i, i) for i in hf_ids]
        result["ok"] = diff <= args.tol and result.get("label_agreement", 1.0) == 1.0
        code = 0 if diff <= args.tol else 1
    except (KeyError, ValueError) as e:
        result["ok"] = False
        result["error"] = str(e)
        code = 2
    print(json.dumps(result))
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Load test of `wick serve` with OpenAI's official Python client (bounded in count and time).

1. Completions: GPT-2-small-shaped random weights, 64 new tokens per request, at concurrency
   1, 4, 16 and 64: aggregate tokens/s, p50 and p99 latency (goal: throughput at 16 >= 6x at 1).
2. Embeddings: all-MiniLM-L6-v2, one 16-token input per request, at the same concurrencies:
   requests/s and latency, beside a sentence-transformers loop in this process doing the same
   requests one at a time (goal >= 2x).
3. Soak: --soak-seconds at twice the measured completion capacity (open loop), mixed with
   embeddings and malformed requests: every request must be answered (a result, a 4xx or a
   503), the server must not crash, and its resident memory must not grow after warm-up.

    scripts/bench_serve.sh  (builds the release binary, then runs this with the venv's Python)
    python scripts/bench_serve.py --wick target/release/wick --minilm ../shared/data/all-MiniLM-L6-v2 \
        --gpt2-tokenizer ../shared/data/gpt2-tokenizer [--threads 2] [--soak-seconds 120]

Prints one JSON object per measurement on stdout, a summary table on stderr.
"""

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))
    return values[k]


def make_gpt2_small(folder, tokenizer_dir):
    """GPT-2 small's shape (124M parameters) with random weights, saved as a HF folder."""
    import shutil
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(folder, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)


def start_server(wick, models, threads, extra):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [wick, "serve", "--port", "0", "--json"] + extra
    for m in models:
        cmd += ["--model", m]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("wick serve did not start: " + " ".join(cmd))
    return proc, json.loads(line)["listening"]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_level(concurrency, requests, deadline_s, one):
    """Runs `requests` calls of `one()` over `concurrency` threads (stopping new ones after
    deadline_s); returns (wall seconds, latencies, results)."""
    latencies, results = [], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + deadline_s
    counter = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None or time.perf_counter() > stop_at:
                return
            t0 = time.perf_counter()
            r = one(i)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, results


def sentences(n, words=14, seed=0):
    rng = random.Random(seed)
    vocab = "the a movie film was great dull long short story actor plot music scene night city river dog cat runs jumps quickly slowly very quite".split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wick", required=True)
    ap.add_argument("--minilm", required=True)
    ap.add_argument("--gpt2-tokenizer", required=True)
    ap.add_argument("--gpt2", help="a GPT-2 folder to use instead of random GPT-2-small weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--level-seconds", type=float, default=90, help="stop starting requests after this long per level")
    ap.add_argument("--waves", type=int, default=2, help="requests per level: waves x concurrency (at least 2 x waves)")
    ap.add_argument("--soak-seconds", type=float, default=120)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: completions,embeddings,soak")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    levels = [int(c) for c in args.concurrency.split(",")]

    import openai
    import torch

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    gpt2 = args.gpt2
    if gpt2 is None:
        gpt2 = os.path.join(tmp.name, "gpt2-small-random")
        make_gpt2_small(gpt2, args.gpt2_tokenizer)
    proc, addr = start_server(args.wick, [gpt2, args.minilm], args.threads, [])
    gpt2_id, minilm_id = os.path.basename(gpt2.rstrip("/")), os.path.basename(args.minilm.rstrip("/"))
    client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=600)
    summary = {}
    try:
        prompts = sentences(256, words=12, seed=1)
        if "completions" not in skip:
            # Warm-up (first-touch of the weights).
            client.completions.create(model=gpt2_id, prompt=prompts[0], max_tokens=4, temperature=0)
            for c in levels:
                def one(i):
                    r = client.completions.create(model=gpt2_id, prompt=prompts[i % len(prompts)], max_tokens=args.max_tokens, temperature=1.0, seed=i)
                    return r.usage.completion_tokens
                la = loadavg()
                wall, lat, res = run_level(c, max(args.waves * c, 2 * args.waves), args.level_seconds, one)
                row = {"part": "completions", "concurrency": c, "requests": len(res), "tokens": sum(res), "seconds": wall,
                       "tokens_per_s": sum(res) / wall, "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "loadavg": la}
                print(json.dumps(row), flush=True)
                log(f"completions c={c:3d}: {row['tokens_per_s']:7.1f} tokens/s, p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s ({len(res)} requests; load {la})")
                summary[("completions", c)] = row
            if ("completions", 1) in summary and ("completions", 16) in summary:
                ratio = summary[("completions", 16)]["tokens_per_s"] / summary[("completions", 1)]["tokens_per_s"]
                log(f"completions: throughput at 16 / at 1 = {ratio:.1f}x (goal >= 6x)")
                print(json.dumps({"part": "completions_ratio_16_over_1", "ratio": ratio}), flush=True)

        if "embeddings" not in skip:
            texts = sentences(512, words=14, seed=2)
            client.embeddings.create(model=minilm_id, input=texts[0])
            best = 0.0
            for c in levels:
                def one(i):
                    r = client.embeddings.create(model=minilm_id, input=texts[i % len(texts)])
                    return len(r.data[0].embedding)
                la = loadavg()
                wall, lat, res = run_level(c, max(64, 16 * c), args.level_seconds, one)
                rps = len(res) / wall
                best = max(best, rps)
                row = {"part": "embeddings", "concurrency": c, "requests": len(res), "seconds": wall, "requests_per_s": rps,
                       "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "loadavg": la}
                print(json.dumps(row), flush=True)
                log(f"embeddings c={c:3d}: {rps:7.1f} requests/s, p50 {row['p50_s'] * 1e3:.1f} ms, p99 {row['p99_s'] * 1e3:.1f} ms (load {la})")
            # The same requests in one Python process, one at a time (2 threads).
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(args.minilm, device="cpu")
            st.encode([texts[0]])
            n = 256
            la = loadavg()
            t0 = time.perf_counter()
            lat = []
            for i in range(n):
                t1 = time.perf_counter()
                st.encode([texts[i % len(texts)]])
                lat.append(time.perf_counter() - t1)
            wall = time.perf_counter() - t0
            row = {"part": "embeddings_sentence_transformers_loop", "requests": n, "requests_per_s": n / wall,
                   "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "loadavg": la}
            print(json.dumps(row), flush=True)
            log(f"sentence-transformers loop: {n / wall:7.1f} requests/s, p50 {row['p50_s'] * 1e3:.1f} ms (load {la}); wick best / loop = {best / (n / wall):.1f}x (goal >= 2x)")
            del st

        if "soak" not in skip:
            soak(proc, addr, client, gpt2_id, minilm_id, prompts, summary, args)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
        log(f"server exit after SIGTERM: {code}")


def soak(proc, addr, client, gpt2_id, minilm_id, prompts, summary, args):
    """Open-loop load at twice the completion capacity, mixed with embeddings and malformed
    requests; every answer must be a result, a 4xx or a 503."""
    import openai

    host, port = addr.rsplit(":", 1)
    # Requests/s of 16 tokens the server sustains at best (from the completion levels).
    best = max([row["tokens_per_s"] for (part, _), row in summary.items() if part == "completions"] or [200.0])
    capacity = best / 16.0
    rate = 2 * capacity
    malformed = [
        ("POST", "/v1/completions", "{not json"),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "temperature": -1})),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**12})),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "model": "nope"})),
        ("POST", "/v1/embeddings", json.dumps({"input": []})),
        ("POST", "/v1/embeddings", "x" * (5 << 20)),
        ("GET", "/v1/completions", ""),
    ]
    outcomes = {}
    lock = threading.Lock()

    def note(kind):
        with lock:
            outcomes[kind] = outcomes.get(kind, 0) + 1

    def one(i):
        r = i % 10
        try:
            if r < 7:
                client.completions.create(model=gpt2_id, prompt=prompts[i % len(prompts)], max_tokens=16, seed=i)
                note("200")
            elif r < 9:
                client.embeddings.create(model=minilm_id, input=prompts[i % len(prompts)])
                note("200")
            else:
                method, path, body = malformed[(i // 10) % len(malformed)]
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                try:
                    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                    status = conn.getresponse().status
                except (ConnectionError, http.client.HTTPException):
                    # The server may close an oversized upload before reading it all.
                    status = "closed-on-oversize" if len(body) > 1 << 20 else "connection-error"
                finally:
                    conn.close()
                note(str(status) if status != 200 else "200-unexpected")
        except openai.APIStatusError as e:
            note(str(e.status_code))
        except Exception as e:  # noqa: BLE001 - every other outcome is a failure to count
            note("error:" + type(e).__name__)

    la = loadavg()
    log(f"soak: {args.soak_seconds:.0f} s at {rate:.1f} requests/s (2x capacity), 10% malformed (load {la})")
    rss = []
    start = time.perf_counter()
    futures = []
    with cf.ThreadPoolExecutor(max_workers=512) as pool:
        i = 0
        next_rss = start
        while time.perf_counter() - start < args.soak_seconds:
            now = time.perf_counter()
            if now >= next_rss:
                rss.append((round(now - start, 1), rss_mib(proc.pid)))
                next_rss += 5
            due = int((now - start) * rate)
            while i < due:
                futures.append(pool.submit(one, i))
                i += 1
            time.sleep(0.005)
            if proc.poll() is not None:
                break
        cf.wait(futures)
    alive = proc.poll() is None
    after_warmup = [m for t, m in rss if t >= 20]
    growth = (after_warmup[-1] - after_warmup[0]) if len(after_warmup) > 1 else float("nan")
    row = {"part": "soak", "seconds": args.soak_seconds, "rate": rate, "sent": i, "answered": sum(outcomes.values()), "outcomes": outcomes,
           "server_alive": alive, "rss_mib": rss, "rss_growth_after_warmup_mib": growth, "loadavg": la}
    print(json.dumps(row), flush=True)
    log(f"soak: sent {i}, answered {row['answered']}, outcomes {outcomes}, alive {alive}, RSS {after_warmup[:1]} -> {after_warmup[-1:]} MiB after warm-up")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Serving throughput, batched against --no-batch: starts `loupe serve` once per mode, drives it with
tools/load_test.py at each client count (streamed text chats, greedy, --max-tokens each) and prints
the Markdown rows for docs/benchmarks.md (CPU named).

    python3 tools/bench_serve.py --loupe target/release/loupe --model bench-models/qwen2-vl-2b-q4k.gguf \
        --clients 1,4,16 --max-tokens 32 [--parallel 16] [--threads 2]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_name():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    name = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    kind = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({kind}, {len(re.findall('^processor', text, re.M))} cores)"


def start(loupe, model, parallel, threads, batch):
    cmd = [loupe, "serve", "--model", model, "--port", "0", "--no-audit", "--parallel", str(parallel)]
    if threads:
        cmd += ["--threads", str(threads)]
    if not batch:
        cmd.append("--no-batch")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            # keep reading its log, so a full pipe never stalls the server
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    sys.exit(f"bench_serve: the server stopped before listening ({proc.wait()})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loupe", default="target/release/loupe")
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", default=str(HERE.parent / "models/loupe-parts-demo/samples/test/crack/000.png"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()

    clients = [int(c) for c in args.clients.split(",")]
    results = {}
    for batch in (True, False):
        proc, url = start(args.loupe, args.model, args.parallel, args.threads, batch)
        try:
            for c in clients:
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    cmd = [sys.executable, str(HERE / "load_test.py"), "--url", url, "--image", args.image,
                           "--clients", str(c), "--requests", str(args.requests), "--mix", "0",
                           "--text-only", "--max-tokens", str(args.max_tokens), "--pid", str(proc.pid),
                           "--json", out.name]
                    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
                    summary = json.load(open(out.name))
                if rc != 0:
                    sys.exit(f"bench_serve: load_test failed: {summary['failures']}")
                results[(batch, c)] = summary
                print(f"{'batched' if batch else 'no-batch'} clients={c}: "
                      f"{summary['completion_tokens_per_s']:.2f} tok/s, ttft p50 {summary['ttft_p50_s']:.2f} s",
                      file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
            time.sleep(1)

    print(f"CPU: {cpu_name()}; model {Path(args.model).name}; {args.max_tokens} tokens per answer, "
          f"{args.requests} requests per client, --parallel {args.parallel}\n")
    print("| clients | batched tok/s | --no-batch tok/s | gain | TTFT p50 batched | TTFT p50 --no-batch | RSS end |")
    print("|---|---|---|---|---|---|---|")
    for c in clients:
        b, n = results[(True, c)], results[(False, c)]
        gain = b["completion_tokens_per_s"] / n["completion_tokens_per_s"]
        print(f"| {c} | {b['completion_tokens_per_s']:.1f} | {n['completion_tokens_per_s']:.1f} | {gain:.2f}x | "
              f"{b['ttft_p50_s']:.2f} s | {n['ttft_p50_s']:.2f} s | {b['rss_end_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()

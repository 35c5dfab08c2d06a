#!/usr/bin/env python3
"""Prefill and decode of GGUF text models, Loupe against llama.cpp's `llama-bench`, in turn.

    python3 tools/bench_gguf_text.py --loupe target/release/loupe --llama-bench LLAMA/build/bin/llama-bench \
        --rounds 3 --prompts 64,512 --decode 64 SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf

For each file and each round: one `loupe bench` (prefill of each prompt length, decode, and with
--batch-sizes the batched decode of that many answers; the better of 2 runs, the first warming the
mapped weights) then one `llama-bench` with the same threads, prompt lengths and decode length (its
warm-up run, then the mean of 2). Prints one Markdown row per file and measure: the median of the
rounds for each side and the median of the per-round ratios (on a shared machine one pair of runs can
land anywhere within +-20%, so the ratio is taken within a round). The CPU model and its SIMD flags
head the table. Standard library only.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path


def cpu_line():
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "asimddp", "i8mm")
            if f in flags]
    cores = len(re.findall(r"^processor", text, re.M))
    return f"{name}, {cores} cores ({', '.join(simd)})"


def loupe(args, model, prompt):
    cmd = [args.loupe, "bench", "--model", model, "--threads", str(args.threads), "--prefill-tokens",
           str(prompt), "--decode-tokens", str(args.decode), "--image-sizes", "--repeat", "2"]
    if args.batch_sizes:
        cmd += ["--batch-sizes", args.batch_sizes]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_gguf_text: loupe bench failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def llama(args, model, prompts):
    cmd = [args.llama_bench, "-m", model, "-t", str(args.threads), "-p", ",".join(map(str, prompts)),
           "-n", str(args.decode), "-r", "2", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_gguf_text: llama-bench failed: {out.stderr[-2000:]}")
    rows = json.loads(out.stdout)
    got = {}
    for r in rows:
        if r["n_gen"] == 0:
            got[f"prefill {r['n_prompt']}"] = r["avg_ts"]
        else:
            got["decode"] = r["avg_ts"]
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--loupe", default="target/release/loupe")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="64,512")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--batch-sizes", default="", help="Loupe's batched decode too (no peer figure)")
    args = ap.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]

    print(f"CPU: {cpu_line()}; {args.threads} threads; {args.rounds} rounds in turn\n")
    print("| model | measure | Loupe tok/s | llama.cpp tok/s | Loupe / llama.cpp |")
    print("|---|---|---|---|---|")
    for model in args.models:
        ours, theirs = {}, {}
        for _ in range(args.rounds):
            got = {}
            for p in prompts:
                b = loupe(args, model, p)
                got[f"prefill {p}"] = b["prefill_tok_s"]
                got.setdefault("decode", b["decode_tok_s"])
                for n, v in b.get("batched_decode", {}).items():
                    got.setdefault(f"decode, {n} answers at once", v["tok_s"])
            peer = llama(args, model, prompts)
            for k, v in got.items():
                ours.setdefault(k, []).append(v)
            for k, v in peer.items():
                theirs.setdefault(k, []).append(v)
        for k, vs in ours.items():
            mine = statistics.median(vs)
            if k in theirs:
                ratio = statistics.median(a / b for a, b in zip(vs, theirs[k]))
                peer = statistics.median(theirs[k])
                print(f"| {Path(model).name} | {k} | {mine:.1f} | {peer:.1f} | {ratio:.2f}x |")
            else:
                print(f"| {Path(model).name} | {k} | {mine:.1f} | | |")


if __name__ == "__main__":
    main()

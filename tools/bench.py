#!/usr/bin/env python3
"""Side by side: `loupe bench` and the transformers peer on one checkpoint, same threads, one after the
other in the same session; prints both JSON results and a Markdown table of ratios.

    .venv/bin/python tools/bench.py --loupe target/release/loupe --model bench-models/qwen2-vl-2b-random \
        --threads 2 [--dtype bf16]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd):
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loupe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    args = ap.parse_args()
    common = [
        "--threads", str(args.threads),
        "--decode-tokens", str(args.decode_tokens),
        "--prefill-tokens", str(args.prefill_tokens),
    ]
    loupe = run([args.loupe, "bench", "--model", args.model, "--dtype", args.dtype, *common])
    peer = run([sys.executable, str(HERE / "bench_transformers.py"), "--model", args.model, "--dtype", args.dtype, *common])
    print(json.dumps({"loupe": loupe, "transformers": peer}, indent=2))

    def row(name, a, b, unit, higher_is_better):
        ratio = (a / b) if higher_is_better else (b / a)
        return f"| {name} | {a:.1f} {unit} | {b:.1f} {unit} | {ratio:.2f}x |"

    gib = 1 << 30
    lines = [
        f"| measure ({args.dtype}, {args.threads} threads) | Loupe | transformers | Loupe speed-up |",
        "|---|---|---|---|",
        row("load", loupe["load_ms"], peer["load_ms"], "ms", False),
    ]
    for side in loupe["image_encode"]:
        lines.append(row(f"image encode {side}x{side}", loupe["image_encode"][side]["ms"], peer["image_encode"][side]["ms"], "ms", False))
    lines += [
        row(f"prefill {loupe['prefill_tokens']} text tokens", loupe["prefill_tok_s"], peer["prefill_tok_s"], "tok/s", True),
        row(f"decode {loupe['decode_tokens']} tokens", loupe["decode_tok_s"], peer["decode_tok_s"], "tok/s", True),
        row("peak RSS", loupe["peak_rss_bytes"] / gib, peer["peak_rss_bytes"] / gib, "GiB", False),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

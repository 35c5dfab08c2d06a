#!/usr/bin/env python3
"""Per-image cost of `loupe inspect` with and without reuse of the shared prompt prefix.

    /work/venv/bin/python tools/bench_inspect.py --loupe target/release/loupe \
        --model bench-models/qwen2-vl-2b-q4k --threads 2 [--size 448] [--images 4] [--refs 2]

Draws `--refs` good reference parts and `--images` parts to inspect (tools/make_inspection_dataset.py),
writes a spec with those references, and runs `loupe inspect --reuse none|features|prefix` on the same
images. Prints a Markdown table of the mean per-image time (first image excluded: it builds the cache)
and its parts. Answers are identical in every mode (checked), so the difference is pure reuse.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loupe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--refs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="loupe-bench-inspect-"))
    subprocess.run([sys.executable, str(ROOT / "tools/make_inspection_dataset.py"), "--out", str(tmp / "ds"),
                    "--seed", "3", "--size", str(a.size), "--train-good", str(a.refs), "--good", str(a.images),
                    "--per-defect", "0"], check=True, stdout=subprocess.DEVNULL)
    refs = "".join(f'\n[[references]]\nimage = "ds/train/good/{i:03d}.png"\nlabel = "good"\n' for i in range(a.refs))
    side = a.size * a.size
    (tmp / "spec.toml").write_text(f'''name = "bench"
instructions = "Inspect the machined part in the last image against the good references."
[[defects]]
name = "scratch"
[[defects]]
name = "dent"
{refs}
[image]
min_pixels = {side}
max_pixels = {side}
[decoding]
max_tokens = {a.max_tokens}
''')
    rows, answers = [], {}
    for mode in ["none", "features", "prefix"]:
        out = tmp / f"out-{mode}"
        cmd = [a.loupe, "inspect", "--spec", str(tmp / "spec.toml"), "--model", a.model, "--threads", str(a.threads),
               "--no-audit", "--reuse", mode, "--out", str(out), str(tmp / "ds/test/good")]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recs = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
        answers[mode] = [r["raw_output"] for r in recs]
        later = recs[1:]
        mean = lambda k: statistics.mean(r["timings"][k] for r in later) / 1e3
        rows.append((mode, recs[0]["timings"]["total_ms"] / 1e3, mean("total_ms"), mean("vision_ms"),
                     mean("prefill_ms"), mean("decode_ms"), statistics.mean(r["prompt_tokens"] for r in later)))
    same = answers["none"] == answers["features"] == answers["prefix"]
    base = rows[0][2]
    print(f"| reuse | first image s | per image s (images 2..{a.images}) | speed-up | vision s | prefill s | decode s | prompt tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, first, total, vis, pre, dec, toks in rows:
        print(f"| {mode} | {first:.1f} | {total:.1f} | {base / total:.2f}x | {vis:.1f} | {pre:.1f} | {dec:.1f} | {toks:.0f} |")
    print(f"\nanswers identical across modes: {same}")


if __name__ == "__main__":
    main()

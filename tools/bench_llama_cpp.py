#!/usr/bin/env python3
"""Side by side with llama.cpp on one random full-size Qwen2-VL checkpoint: `loupe bench` and llama.cpp's
own tools (`llama-bench` for prefill and decode, `llama-mtmd-cli` for the image encode, load time and
peak memory), same threads, same test card, one after the other in one session.

    .venv/bin/python tools/bench_llama_cpp.py --llama-bin LLAMA/build/bin --converter LLAMA/convert_hf_to_gguf.py \
        --model bench-models/qwen2-vl-2b-random --loupe target/release/loupe \
        --loupe-model bench-models/qwen2-vl-2b-q4k [--quant Q4_K_M] [--threads 2]

llama.cpp is not part of Loupe: build it yourself (docs/benchmarks.md says how) and pass the folder of
its binaries. The checkpoint (published layout) is converted once with llama.cpp's own converter
(`--outtype f16`, and `--mmproj` for the vision file) and quantized with its `llama-quantize`; the GGUF
files go under --work. Prints both results as JSON and a Markdown table with Loupe's ratio.

With `--text-rounds N`, prefill and decode are then measured N more times, Loupe and llama.cpp taking
turns (one `loupe bench` without images, one `llama-bench`), and each round's ratio is printed with
their median: on a noisy machine one pair of runs can land anywhere within +-20%.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def test_image(side: int) -> Image.Image:
    """The same test card as `loupe bench` and tools/bench_transformers.py."""
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x * 255 // side, y * 255 // side, ((x // 7) ^ (y // 5)) & 0xFF], -1).astype(np.uint8)
    return Image.fromarray(img)


def run(cmd: list, env=None) -> tuple[str, int]:
    """Runs cmd; returns its stdout+stderr and its own peak RSS in bytes."""
    print("$", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({status}): {' '.join(str(c) for c in cmd)}\n{text[-3000:]}")
    return text, usage.ru_maxrss * 1024


def gguf_files(a) -> tuple[Path, Path]:
    a.work.mkdir(parents=True, exist_ok=True)
    f16, mmproj = a.work / "model-f16.gguf", a.work / "mmproj-f16.gguf"
    quant = a.work / f"model-{a.quant}.gguf"
    env = dict(os.environ, PYTHONPATH=str(Path(a.converter).parent / "gguf-py"))
    if not f16.exists():
        run([sys.executable, a.converter, a.model, "--outtype", "f16", "--outfile", f16], env)
    if not mmproj.exists():
        run([sys.executable, a.converter, a.model, "--outtype", "f16", "--mmproj", "--outfile", mmproj], env)
    if not quant.exists():
        run([a.llama_bin / "llama-quantize", f16, quant, a.quant, str(a.threads)])
    return quant, mmproj


def llama_text(a, model: Path) -> dict:
    """`llama-bench`'s prefill and decode. Decode is measured at two depths: an empty context, and after as
    many tokens as the prefill (what `loupe bench` measures: its decode continues the prefilled prompt)."""
    text, _ = run([a.llama_bin / "llama-bench", "-m", model, "-t", a.threads, "-p", a.prefill_tokens,
                   "-n", a.decode_tokens, "-d", f"0,{a.prefill_tokens}", "-r", a.repetitions, "-o", "json"])
    rows = json.loads(text[text.index("["):text.rindex("]") + 1])
    depth = lambda r: r.get("n_depth", 0)
    prefill = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0 and depth(r) == 0)
    decode = next(r for r in rows if r["n_gen"] > 0 and depth(r) == a.prefill_tokens)
    decode_empty = next(r for r in rows if r["n_gen"] > 0 and depth(r) == 0)
    return {
        "peer": f"llama.cpp {rows[0].get('build_commit', '?')} (build {rows[0].get('build_number', '?')}), {a.quant}",
        "threads": a.threads,
        "prefill_tokens": a.prefill_tokens,
        "prefill_tok_s": prefill["avg_ts"],
        "decode_tokens": a.decode_tokens,
        "decode_tok_s": decode["avg_ts"],
        "decode_tok_s_empty_context": decode_empty["avg_ts"],
    }


def llama_cpp(a, model: Path, mmproj: Path) -> dict:
    result = llama_text(a, model) | {"image_encode": {}}
    peak = 0
    with tempfile.TemporaryDirectory() as tmp:
        for side in a.image_sizes:
            card = Path(tmp) / f"card{side}.png"
            test_image(side).save(card)
            t = time.perf_counter()
            text, rss = run([a.llama_bin / "llama-mtmd-cli", "-m", model, "--mmproj", mmproj, "--image", card,
                             "-p", "Describe the image.", "-n", "1", "-t", a.threads, "--temp", "0", "-lv", "4",
                             "--image-max-tokens", str((side // 28) ** 2)])
            wall = (time.perf_counter() - t) * 1e3
            enc = re.search(r"batch encoding done in (\d+) ms", text)
            toks = re.search(r"n_tokens_batch = (\d+)", text)
            load = re.search(r"load time\s*=\s*([\d.]+) ms", text)
            result["image_encode"][str(side)] = {
                "ms": float(enc.group(1)) if enc else None,
                "image_tokens": int(toks.group(1)) if toks else None,
                "process_wall_ms": wall,
            }
            if load and "load_ms" not in result:
                result["load_ms"] = float(load.group(1))
            peak = max(peak, rss)
    result["peak_rss_bytes"] = peak
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-bench, llama-mtmd-cli, llama-quantize")
    ap.add_argument("--converter", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--model", required=True, help="the Hugging Face checkpoint (published layout)")
    ap.add_argument("--loupe", required=True)
    ap.add_argument("--loupe-model", required=True, help="what Loupe loads (e.g. `loupe quantize --quant q4_k` of --model)")
    ap.add_argument("--work", type=Path, default=Path("bench-models/llama-cpp"))
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=1)
    ap.add_argument("--image-sizes", default="448,896")
    ap.add_argument("--text-rounds", type=int, default=0,
                    help="then N more rounds of prefill and decode only, Loupe and llama.cpp taking turns")
    ap.add_argument("--loupe-on-peer-files", action="store_true",
                    help="also run Loupe on llama.cpp's own pair (the quantized text GGUF and its mmproj)")
    a = ap.parse_args()
    a.image_sizes = [int(s) for s in a.image_sizes.split(",")]

    model, mmproj = gguf_files(a)
    peer = llama_cpp(a, model, mmproj)

    def loupe_bench(*model_args, images=True) -> dict:
        sizes = [",".join(map(str, a.image_sizes))] if images else []
        text, _ = run([a.loupe, "bench", *model_args, "--threads", a.threads,
                       "--prefill-tokens", a.prefill_tokens, "--decode-tokens", a.decode_tokens,
                       "--image-sizes", *sizes])
        return json.loads(text[text.index("{"):text.rindex("}") + 1])

    loupe = loupe_bench("--model", a.loupe_model)
    results = {"loupe": loupe, "llama.cpp": peer}
    if a.loupe_on_peer_files:
        results["loupe on llama.cpp's files"] = loupe_bench("--model", model, "--mmproj", mmproj)
    print(json.dumps(results, indent=2))

    def row(name, x, y, unit, higher_is_better):
        if x is None or y is None:
            return f"| {name} | {x} | {y} | - |"
        ratio = x / y if higher_is_better else y / x
        return f"| {name} | {x:.1f} {unit} | {y:.1f} {unit} | {ratio:.2f}x |"

    gib = 1 << 30

    def table(label: str, ours: dict) -> str:
        lines = [f"| measure ({a.threads} threads) | {label} | llama.cpp {a.quant} | Loupe speed-up |", "|---|---|---|---|",
                 row("load", ours["load_ms"], peer.get("load_ms"), "ms", False)]
        for side in a.image_sizes:
            s = str(side)
            lines.append(row(f"image encode {s}x{s}", ours["image_encode"][s]["ms"], peer["image_encode"][s]["ms"], "ms", False))
        lines += [
            row(f"prefill {a.prefill_tokens} text tokens", ours["prefill_tok_s"], peer["prefill_tok_s"], "tok/s", True),
            row(f"decode {a.decode_tokens} tokens after the {a.prefill_tokens}-token prefill", ours["decode_tok_s"],
                peer["decode_tok_s"], "tok/s", True),
            f"| decode {a.decode_tokens} tokens, empty context | - | {peer['decode_tok_s_empty_context']:.1f} tok/s | - |",
            row("peak RSS", ours["peak_rss_bytes"] / gib, peer["peak_rss_bytes"] / gib, "GiB", False),
        ]
        return "\n".join(lines)

    print(table("Loupe", loupe))
    if a.loupe_on_peer_files:
        # The same measures, Loupe reading llama.cpp's own two files (f16 vision tower, computed in f32).
        print(table(f"Loupe on llama.cpp's {a.quant} + mmproj files", results["loupe on llama.cpp's files"]))
    if a.text_rounds:
        ratios = {"prefill_tok_s": [], "decode_tok_s": []}
        print("\n| round | Loupe prefill | llama.cpp prefill | ratio | Loupe decode | llama.cpp decode | ratio |")
        print("|---|---|---|---|---|---|---|")
        for i in range(a.text_rounds):
            ours, theirs = loupe_bench("--model", a.loupe_model, images=False), llama_text(a, model)
            cells = []
            for k in ratios:
                ratios[k].append(ours[k] / theirs[k])
                cells += [f"{ours[k]:.1f}", f"{theirs[k]:.1f}", f"{ratios[k][-1]:.2f}x"]
            print(f"| {i + 1} | " + " | ".join(cells) + " |", flush=True)
        print(f"median ratio over {a.text_rounds} rounds: prefill {np.median(ratios['prefill_tok_s']):.2f}x, "
              f"decode {np.median(ratios['decode_tok_s']):.2f}x")

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the fixtures of llama.cpp's vision GGUF pairs: two tiny parity checkpoints (a Qwen2-VL and a
Qwen2.5-VL one, made by tools/make_fixtures.py, whose reference.safetensors holds transformers' outputs)
converted by llama.cpp's own converter into the two files users download: the text model and its
vision file (`mmproj`).

    .venv/bin/python tools/make_gguf_vl_fixture.py --converter LLAMA_CPP/convert_hf_to_gguf.py

`--converter` is llama.cpp's `convert_hf_to_gguf.py` (e.g. from the llama.cpp tree vendored in the
`llama-cpp-python` sdist); it is run, not copied. One thing is changed for the run: the converter
recognizes a BPE tokenizer by hashing how it splits a test text, and our tiny tokenizer's vocabulary is
not in its table; it uses the Qwen2 pre-tokenizer (tools/make_fixtures.py), so the converter is told
`qwen2`, as it would find for a real Qwen2-VL.

Writes tests/fixtures/gguf_vl/<family>/model-f32.gguf and mmproj-model-f32.gguf (f32, so that parity
with the f32 reference is exact up to summation order).
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PAIRS = {
    "qwen2_vl": "qwen2_vl/mha4_tied_bf16_v5",
    "qwen2_5_vl": "qwen2_5_vl/win112_gqa2_tied_gguf_v5",
}

# Runs the converter with the pre-tokenizer answer fixed (see the module docstring).
RUN = """
import runpy, sys
converter = sys.argv[1]
sys.path.insert(0, converter.rsplit("/", 1)[0])
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [converter] + sys.argv[2:]
runpy.run_path(converter, run_name="__main__")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--converter", required=True, type=Path)
    a = ap.parse_args()
    for family, checkpoint in PAIRS.items():
        out = FIXTURES / "gguf_vl" / family
        out.mkdir(parents=True, exist_ok=True)
        src = FIXTURES / checkpoint
        for extra, name in [([], "model-f32.gguf"), (["--mmproj"], "mmproj-model-f32.gguf")]:
            subprocess.run(
                [sys.executable, "-c", RUN, str(a.converter.resolve()), str(src), "--outtype", "f32",
                 "--outfile", str(out / name), *extra],
                check=True, stdout=subprocess.DEVNULL,
            )
            print(f"  {family}/{name}: {(out / name).stat().st_size / 1e3:.0f} kB (from {checkpoint})")


if __name__ == "__main__":
    main()

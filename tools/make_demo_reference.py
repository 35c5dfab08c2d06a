#!/usr/bin/env python3
"""Draws the demonstration model's bundled samples and records transformers' greedy answers for them.

    /work/venv/bin/python tools/make_demo_reference.py [--model models/loupe-parts-demo]

Writes MODEL/samples/ (MVTec layout, seed 2024, at the model's training size: 6 good parts and two of each defect, with masks
and labels.jsonl) and MODEL/samples/reference.json: for each sample, the token ids and text that
transformers 5.23 (f32) generates greedily for the prompt `loupe inspect` builds from MODEL/spec.toml.
Loupe's parity test compares its own greedy tokens with these.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
spec_ = importlib.util.spec_from_file_location("train", ROOT / "tools" / "train_inspection_model.py")
train = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(train)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "loupe-parts-demo")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    a = ap.parse_args()
    samples = a.model / "samples"
    size = json.loads((a.model / "training.json").read_text())["image_size"]
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_inspection_dataset.py"), "--out", str(samples),
                    "--seed", "2024", "--size", str(size), "--train-good", "0", "--good", "6", "--per-defect", "2"],
                   check=True)
    spec = tomllib.loads((a.model / "spec.toml").read_text())
    proc = AutoProcessor.from_pretrained(a.model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    prompt = proc.apply_chat_template(train.messages(spec), tokenize=False, add_generation_prompt=True)
    ref = {}
    for line in (samples / "labels.jsonl").read_text().splitlines():
        row = json.loads(line)
        img = Image.open(samples / row["image"]).convert("RGB")
        inputs = proc(text=[prompt], images=[img], return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False)
        new = g[0, inputs["input_ids"].shape[1]:].tolist()
        ref[row["image"]] = {
            "class": row["class"],
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "tokens": new,
            "text": proc.tokenizer.decode(new, skip_special_tokens=True),
        }
        print(f"{row['image']:28s} {row['class']:13s} {ref[row['image']]['text']}")
    (samples / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")


if __name__ == "__main__":
    main()

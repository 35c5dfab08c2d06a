#!/usr/bin/env python3
"""Config fixtures as the ecosystem writes them, for every family Loupe runs.

For each family, `published/` holds the key set of the published checkpoints' `config.json` and
`preprocessor_config.json` (and `generation_config.json` where the published file was found) (Qwen2-VL-2B/7B-Instruct, Qwen2.5-VL-3B/7B-Instruct, Qwen3-VL-2B/4B-Instruct,
Qwen3.5 small sizes: the keys, their nesting and their spelling as those files have them), with the sizes
of a committed tiny checkpoint so that the weights of `tests/fixtures/<family>/<weights>/` fit them.
`resaved/` is the same pair after a load and `save_pretrained` with the pinned transformers
(tools/requirements.txt): what every fine-tune, merge or re-upload of the checkpoint carries.

The published files were read with the search tools; facts carried over, not files:
- Qwen2-VL / Qwen2.5-VL: flat text fields, `vision_config.in_chans` (no `in_channels`) and
  `spatial_patch_size`, top-level `rope_scaling {"type": "mrope"}` and `rope_theta`, `torch_dtype`,
  `vision_token_id`; preprocessor with `min_pixels` / `max_pixels` only.
- Qwen3-VL: `text_config` (with `rope_scaling {mrope_interleaved, mrope_section, rope_type}`,
  `rope_theta` beside it, `dtype`), `vision_config.in_channels`; preprocessor with `size` only.
- Qwen3.5: `text_config.rope_parameters` (with `rope_theta` and `partial_rotary_factor` inside),
  `mtp_num_hidden_layers`, `attn_output_gate`, `full_attention_interval`; preprocessor as Qwen3-VL's.

Run: venv/bin/python tools/make_config_fixtures.py  (writes tests/fixtures/configs/)
"""
import json
import pathlib
import shutil

import transformers
from transformers import AutoConfig, AutoImageProcessor, GenerationConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "configs"


def load(family, name):
    return json.loads((FIX / family / name / "config.json").read_text())


def ids(c):
    return {k: c[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}


def flat(c, model_type, arch, dtype, vision):
    """The published Qwen2-VL / Qwen2.5-VL layout: text fields at the top level."""
    return {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": 420,
        "eos_token_id": c["eos_token_id"],
        **ids(c),
        "vision_token_id": 431,
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "max_window_layers": c["num_hidden_layers"],
        "model_type": model_type,
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"],
        "sliding_window": c["max_position_embeddings"],
        "tie_word_embeddings": c["tie_word_embeddings"],
        "torch_dtype": dtype,
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision,
        "rope_scaling": {"type": "mrope", "mrope_section": c["rope_scaling"]["mrope_section"]},
        "vocab_size": c["vocab_size"],
    }


def qwen2_vl():
    name = "gqa2_tied_published"
    c = load("qwen2_vl", name)
    v = c["vision_config"]
    vision = {
        "depth": v["depth"], "embed_dim": v["embed_dim"], "mlp_ratio": v["mlp_ratio"],
        "num_heads": v["num_heads"], "in_chans": 3, "hidden_size": v["hidden_size"],
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    }
    return flat(c, "qwen2_vl", "Qwen2VLForConditionalGeneration", "float32", vision), name


def qwen2_5_vl():
    name = "win112_mqa4_untied_bf16_published"
    c = load("qwen2_5_vl", name)
    v = c["vision_config"]
    vision = {
        "depth": v["depth"], "hidden_act": "silu", "hidden_size": v["hidden_size"],
        "intermediate_size": v["intermediate_size"], "num_heads": v["num_heads"], "in_chans": 3,
        "out_hidden_size": v["out_hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": v["window_size"],
        "fullatt_block_indexes": v["fullatt_block_indexes"], "tokens_per_second": v["tokens_per_second"],
        "temporal_patch_size": 2,
    }
    return flat(c, "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "bfloat16", vision), name


def qwen3_vl():
    c = load("qwen3_vl", "ds1_mqa4_hd32_untied_bf16_published")
    t, v = c["text_config"], c["vision_config"]
    text = {k: t[k] for k in (
        "attention_bias", "attention_dropout", "head_dim", "hidden_act", "hidden_size", "intermediate_size",
        "max_position_embeddings", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
        "rms_norm_eps", "tie_word_embeddings", "use_cache", "vocab_size")}
    text.update(bos_token_id=420, eos_token_id=t["eos_token_id"], dtype="bfloat16", initializer_range=0.02,
                model_type="qwen3_vl_text", rope_theta=t["rope_theta"], rope_scaling=t["rope_scaling"])
    vision = {k: v[k] for k in (
        "deepstack_visual_indexes", "depth", "hidden_act", "hidden_size", "in_channels", "intermediate_size",
        "num_heads", "num_position_embeddings", "out_hidden_size", "patch_size", "spatial_merge_size",
        "temporal_patch_size")}
    vision.update(initializer_range=0.02, model_type="qwen3_vl")
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": c["image_token_id"],
        "model_type": "qwen3_vl",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": c["tie_word_embeddings"],
        "transformers_version": "4.57.0.dev0",
        "video_token_id": c["video_token_id"],
        "vision_config": dict(sorted(vision.items())),
        "vision_end_token_id": c["vision_end_token_id"],
        "vision_start_token_id": c["vision_start_token_id"],
    }, "ds1_mqa4_hd32_untied_bf16_published"


def qwen3_5():
    c = load("qwen3_5", "hybrid_interval4_mqa_untied_bf16_published")
    t, v = c["text_config"], c["vision_config"]
    text = {k: t[k] for k in (
        "attention_bias", "attention_dropout", "head_dim", "hidden_act", "hidden_size", "intermediate_size",
        "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_num_key_heads",
        "linear_num_value_heads", "linear_value_head_dim", "max_position_embeddings", "num_attention_heads",
        "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "use_cache",
        "vocab_size")}
    rs = t["rope_scaling"]
    text.update(
        attn_output_gate=True, dtype="bfloat16", eos_token_id=t["eos_token_id"], full_attention_interval=4,
        initializer_range=0.02, mlp_only_layers=[], model_type="qwen3_5_text", mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False, mamba_ssm_dtype="float32",
        rope_parameters={"mrope_interleaved": True, "mrope_section": rs["mrope_section"], "rope_type": "default",
                         "rope_theta": t["rope_theta"], "partial_rotary_factor": rs["partial_rotary_factor"]})
    vision = {k: v[k] for k in (
        "depth", "hidden_act", "hidden_size", "in_channels", "intermediate_size", "num_heads",
        "num_position_embeddings", "out_hidden_size", "patch_size", "spatial_merge_size", "temporal_patch_size")}
    vision.update(deepstack_visual_indexes=[], initializer_range=0.02, model_type="qwen3_5")
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "image_token_id": c["image_token_id"],
        "model_type": "qwen3_5",
        "text_config": dict(sorted(text.items())),
        "tie_word_embeddings": c["tie_word_embeddings"],
        "transformers_version": "4.57.0.dev0",
        "video_token_id": c["video_token_id"],
        "vision_config": dict(sorted(vision.items())),
        "vision_end_token_id": c["vision_end_token_id"],
        "vision_start_token_id": c["vision_start_token_id"],
    }, "hybrid_interval4_mqa_untied_bf16_published"


def preprocessor(family, weights):
    p = json.loads((FIX / family / weights / "preprocessor_config.json").read_text())
    lo, hi = p["min_pixels"], p["max_pixels"]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # Published: min_pixels / max_pixels, no size.
        keys = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_processor_type",
                "image_std", "merge_size", "patch_size", "resample", "rescale_factor", "temporal_patch_size",
                "processor_class")
        out = {k: p[k] for k in keys}
        out.update(min_pixels=lo, max_pixels=hi)
        return out
    # Published Qwen3-VL / Qwen3.5: size only.
    return {"size": {"longest_edge": hi, "shortest_edge": lo}, "patch_size": p["patch_size"],
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": p["image_mean"], "image_std": p["image_std"],
            "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}


# generation_config.json as published (Qwen2.5-VL-3B-Instruct's and Qwen3-VL-2B/4B-Instruct's, read
# verbatim), the token ids moved to the tiny vocabulary (151643 -> 420, 151645 -> 422). Qwen2-VL's
# and Qwen3.5's published files were not found: none is written for them.
GENERATION = {
    "qwen2_5_vl": {"bos_token_id": 420, "pad_token_id": 420, "do_sample": True, "eos_token_id": [422, 420],
                   "repetition_penalty": 1.05, "temperature": 0.000001, "transformers_version": "4.49.0"},
    "qwen3_vl": {"bos_token_id": 420, "pad_token_id": 420, "do_sample": True, "eos_token_id": [422, 420],
                 "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7,
                 "transformers_version": "4.56.0"},
}


def main():
    assert transformers.__version__ == "5.23.0", transformers.__version__
    manifest = {}
    for family, make in [("qwen2_vl", qwen2_vl), ("qwen2_5_vl", qwen2_5_vl), ("qwen3_vl", qwen3_vl),
                         ("qwen3_5", qwen3_5)]:
        cfg, weights = make()
        pub, res = OUT / family / "published", OUT / family / "resaved"
        for d in (pub, res):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        (pub / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (pub / "preprocessor_config.json").write_text(json.dumps(preprocessor(family, weights), indent=2) + "\n")
        AutoConfig.from_pretrained(pub).save_pretrained(res)
        AutoImageProcessor.from_pretrained(pub).save_pretrained(res)
        if family in GENERATION:
            (pub / "generation_config.json").write_text(json.dumps(GENERATION[family], indent=2) + "\n")
            GenerationConfig.from_pretrained(pub).save_pretrained(res)
        manifest[family] = weights
    (OUT / "weights.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()

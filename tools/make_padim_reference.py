"""anomalib's own PaDiM on loupe-core's tiny random ResNet-18 backbone fixture, as the reference for
Loupe's PaDiM (crates/loupe-inspect/tests/anomalib.rs).

Draws a few seeded ring images (good ones to learn from; good and dented ones to score), runs
anomalib's `PadimModel` (layer1 + layer2 + layer3, the later two resized to layer1's grid, a random
subset of 20 of the 48 channels, a Gaussian per position with 0.01 added to the covariance's
diagonal, Mahalanobis distances, bilinear to the image, sigma-4 smoothing) with the fixture's weights
in its timm feature extractor, and writes the images, the channels anomalib drew, its image scores and
anomaly maps to crates/loupe-inspect/tests/fixtures/padim_anomalib/.

    venv/bin/python tools/make_padim_reference.py   # pinned: tools/requirements-anomalib.txt
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

from anomalib.models.image.padim.torch_model import PadimModel

from make_patchcore_reference import BACKBONE, SIZE, ring, tensor

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "crates", "loupe-inspect", "tests", "fixtures", "padim_anomalib")
FEATURES = 20


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(5)
    net = ResNet(BasicBlock, [1, 2, 1, 1], channels=(8, 16, 24, 32), stem_width=8, num_classes=5)
    state = load_file(os.path.join(BACKBONE, "model.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    net.eval()

    model = PadimModel(layers=["layer1", "layer2", "layer3"], backbone="resnet18", pre_trained=False)
    # The fixture's own narrow ResNet in place of timm's full-width resnet18, and as many channels
    # drawn from its 48 as FEATURES (anomalib draws them at construction, from 448 for resnet18).
    model.feature_extractor.feature_extractor = FeatureListNet(net, out_indices=(1, 2, 3)).eval()
    model.n_features_original = 8 + 16 + 24
    model.n_features = FEATURES
    model.idx = torch.randperm(model.n_features_original)[:FEATURES]

    rng = np.random.default_rng(12)
    train = [ring(rng, None) for _ in range(8)]
    test = [ring(rng, None), ring(rng, (14.0, 2.0)), ring(rng, (-3.0, -14.0))]
    for i, img in enumerate(train):
        Image.fromarray(img).save(os.path.join(OUT, f"train_{i}.png"))
    for i, img in enumerate(test):
        Image.fromarray(img).save(os.path.join(OUT, f"test_{i}.png"))

    model.train()
    with torch.no_grad():
        for img in train:
            model(tensor(img))
    model.fit()
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
                "channels": [int(i) for i in model.idx],
                "mean_shape": list(model.gaussian.mean.shape),
                "anomalib": anomalib.__version__,
                "timm": timm.__version__,
                "torch": torch.__version__,
            },
            f,
            indent=2,
        )
    print("scores", scores, "mean", tuple(model.gaussian.mean.shape))


if __name__ == "__main__":
    main()

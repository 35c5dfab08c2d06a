#!/usr/bin/env python3
"""anomalib's PatchCore or PaDiM as a peer for `loupe learn` / `loupe eval`, on the same images.

It fits anomalib's own PatchcoreModel (timm backbone, layer2 + layer3 features, 3x3 average pooling,
k-centre greedy coreset, nearest-neighbour patch scores, Gaussian-smoothed map) or PadimModel
(layer1 + layer2 + layer3, a random subset of channels, a Gaussian per position) on good images and
scores an MVTec-AD-layout test folder: image AUROC and AUPRC (scikit-learn), pixel AUROC over all
pixels, and anomalib's own AUPRO at a 30% pixel false-positive rate. It does not use anomalib's
Lightning engine or its data modules: only the model, so the split and the preprocessing are
exactly those stated here.

No backbone weights can be downloaded on an offline machine: `--weights random` (the default) runs
the backbone with timm's seeded random initialisation, and `--weights FILE` loads weights you have: a
state dict (`.pth`) or the `model.safetensors` of a timm-layout folder, the very file `loupe learn
--backbone DIR` reads (every backbone tensor must be in it). Say which in every figure.

    pip install -r tools/requirements-anomalib.txt
    python3 tools/anomalib_peer.py --train DATA1/train/good --test DATA2 [--size 224] [--json out.json]
    python3 tools/anomalib_peer.py --method padim --backbone tf_efficientnet_lite0 \
        --layers blocks.1 blocks.2 blocks.4 --features 100 --weights DIR/model.safetensors ...
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch
from PIL import Image


def images(folder):
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    return sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix.lower() in exts)


# The normalization the backbone's weights were trained with: ImageNet's unless the weights' folder
# says otherwise (its config.json's pretrained_cfg, as `loupe learn --backbone` reads it).
NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def load(path, size):
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(NORM["mean"]).view(3, 1, 1)
    std = torch.tensor(NORM["std"]).view(3, 1, 1)
    return (x - mean) / std


def mask_of(root, cls, stem, size):
    p = pathlib.Path(root) / "ground_truth" / cls / f"{stem}_mask.png"
    if cls == "good" or not p.is_file():
        return np.zeros((size, size), dtype=bool), cls == "good" or p.is_file()
    m = Image.open(p).convert("L").resize((size, size), Image.NEAREST)
    return np.asarray(m) > 127, True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="folder of good images to learn from")
    ap.add_argument("--test", required=True, help="MVTec AD layout root (test/<class>/, ground_truth/)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--method", choices=["patchcore", "padim"], default="patchcore")
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--layers", nargs="+", help="default: layer2 layer3 (patchcore), layer1 layer2 layer3 (padim)")
    ap.add_argument(
        "--coreset", type=float, default=0.1, help="patchcore: the share of features kept (1: the full bank, no sampling)"
    )
    ap.add_argument("--features", type=int, help="padim: channels kept (default: anomalib's for the backbone)")
    ap.add_argument(
        "--channels-from",
        help="padim: keep the channels a Loupe PaDiM bank kept (its header), not anomalib's own random draw",
    )
    ap.add_argument("--weights", default="random", help="'random' or a backbone state-dict file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()

    import anomalib
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from sklearn.metrics import average_precision_score, roc_auc_score

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    # Inference only: without this the bank keeps the backbone's autograd graph, and anomalib's
    # coreset selection on it grows past 24 GB (EfficientNet-Lite0, 30 images).
    torch.set_grad_enabled(False)
    if a.method == "patchcore":
        layers = a.layers or ["layer2", "layer3"]
        model = PatchcoreModel(layers=layers, backbone=a.backbone, pre_trained=False)
    else:
        layers = a.layers or ["layer1", "layer2", "layer3"]
        model = PadimModel(layers=layers, backbone=a.backbone, pre_trained=False, n_features=a.features)
        if a.channels_from:
            from safetensors import safe_open

            with safe_open(a.channels_from, "pt") as f:
                header = json.loads(f.metadata()["loupe_anomaly"])
            model.idx = torch.tensor(header["channels"])
            model.n_features = len(header["channels"])
    if a.weights != "random":
        if a.weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(a.weights)
            config = pathlib.Path(a.weights).with_name("config.json")
            if config.is_file():
                cfg = json.loads(config.read_text()).get("pretrained_cfg", {})
                NORM.update({k: cfg[k] for k in ("mean", "std") if k in cfg})
        else:
            state = torch.load(a.weights, map_location="cpu")
        missing, _ = model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            sys.exit(f"{a.weights} lacks backbone tensors {missing[:5]}...: not {a.backbone}'s weights")

    train = images(a.train)
    if not train:
        sys.exit(f"no images in {a.train}")
    t0 = time.perf_counter()
    model.train()
    for i in range(0, len(train), 8):
        model(torch.stack([load(p, a.size) for p in train[i : i + 8]]))
    if a.method == "patchcore" and a.coreset >= 1.0:
        model.memory_bank = torch.vstack(model.embedding_store)
        model.embedding_store = []
    elif a.method == "patchcore":
        model.subsample_embedding(a.coreset)
    else:
        model.fit()
    fit_s = time.perf_counter() - t0

    model.eval()
    test_root = pathlib.Path(a.test) / "test"
    scores, labels, maps, masks, all_masked, per_image = [], [], [], [], True, {}
    t0 = time.perf_counter()
    n = 0
    for cls_dir in sorted(d for d in test_root.iterdir() if d.is_dir()):
        for p in images(cls_dir):
            out = model(load(p, a.size).unsqueeze(0))
            scores.append(float(out.pred_score.reshape(-1)[0]))
            per_image[f"{cls_dir.name}/{p.name}"] = scores[-1]
            labels.append(int(cls_dir.name != "good"))
            maps.append(out.anomaly_map.reshape(a.size, a.size).numpy())
            m, known = mask_of(a.test, cls_dir.name, p.stem, a.size)
            all_masked &= known
            masks.append(m)
            n += 1
    ms = 1e3 * (time.perf_counter() - t0) / max(n, 1)

    res = {
        "peer": f"anomalib {anomalib.__version__} {type(model).__name__}",
        "backbone": a.backbone,
        "weights": a.weights if a.weights != "random" else f"random (timm init, seed {a.seed})",
        "normalization": NORM,
        "layers": layers,
        "size": a.size,
        "train_images": len(train),
        "test_images": n,
        "fit_s": round(fit_s, 2),
        "ms_per_image": round(ms, 1),
        "image_auroc": roc_auc_score(labels, scores),
        **(
            {"coreset": a.coreset, "memory_bank": int(model.memory_bank.shape[0])}
            if a.method == "patchcore"
            else {"features": int(model.n_features), "positions": int(model.gaussian.mean.shape[1])}
        ),
        "image_auprc": average_precision_score(labels, scores),
    }
    if all_masked:
        mp, mk = np.stack(maps), np.stack(masks)
        res["pixel_auroc"] = roc_auc_score(mk.reshape(-1), mp.reshape(-1))
        pro = _AUPRO(fpr_limit=0.3)
        pro.update(torch.from_numpy(mp), torch.from_numpy(mk.astype(np.int64)))
        res["pro"] = float(pro.compute())
    print(json.dumps(res, indent=2))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({**res, "scores": per_image}, indent=2))


if __name__ == "__main__":
    main()

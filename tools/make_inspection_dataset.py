#!/usr/bin/env python3
"""Draws a synthetic visual-inspection dataset in the MVTec AD layout: machined parts (washer, bracket,
PCB pad, bolt head) under varied light, position, rotation, scale and noise, good or with one drawn
defect (scratch, dent, crack, missing_hole, stain) and its pixel mask; plain metal, or a textured
surface (`--surface`: random grain, brushed metal, a woven pattern, polycrystalline cells, or a mix),
the case where a per-pixel statistic fails and a detector must know the texture.

    .venv/bin/python tools/make_inspection_dataset.py --out DIR --seed 1 --good 40 --per-defect 20 [--parts washer] [--surface plain]

Writes
    DIR/train/good/NNN.png                      good parts (reference images, training data)
    DIR/test/good/NNN.png, DIR/test/<defect>/NNN.png
    DIR/ground_truth/<defect>/NNN_mask.png      255 where the defect is
    DIR/labels.jsonl                            one row per image: split, class, part, pixel boxes, and
                                                the verdict JSON a perfect model answers (Qwen2-VL 0..1000 boxes)

Deterministic for a given --seed (numpy + Pillow only: tools/requirements-dataset.txt).
"""

import argparse
import json
import math
from pathlib import Path

try:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter
except ModuleNotFoundError as e:
    raise SystemExit(
        f"make_inspection_dataset.py needs numpy and Pillow ({e}); install the pinned versions with\n"
        "  python3 -m venv .venv && .venv/bin/pip install -r tools/requirements-dataset.txt\n"
        "and run it as .venv/bin/python tools/make_inspection_dataset.py ..."
    ) from None

DEFECTS = ["scratch", "dent", "crack", "missing_hole", "stain"]
PARTS = ["washer", "bracket", "pcb_pad", "bolt_head"]
SURFACES = ["plain", "grain", "brushed", "woven", "crystal", "mixed"]


def blurred_noise(rng, size, radius):
    n = rng.normal(0, 1, (size, size)).astype(np.float32)
    img = Image.fromarray(((n - n.min()) / (np.ptp(n) + 1e-9) * 255).astype(np.uint8))
    b = np.array(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    return (b - b.mean()) / (b.std() + 1e-6)


def texture(rng, surface, size):
    """A multiplicative brightness pattern (about 1) for the part's surface."""
    if surface == "mixed":
        surface = SURFACES[1 + rng.integers(len(SURFACES) - 2)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, math.pi)
    if surface == "grain":
        return 1 + 0.10 * blurred_noise(rng, size, rng.uniform(0.8, 1.6))
    if surface == "brushed":
        # Streaks along a random direction: noise over the perpendicular coordinate, a little along.
        across = (-math.sin(a) * xx + math.cos(a) * yy) * 3
        idx = np.mod(across.astype(np.int64), 4 * size)
        streaks = rng.normal(0, 1, 4 * size).astype(np.float32)[idx]
        return 1 + 0.08 * streaks + 0.03 * blurred_noise(rng, size, 1.0)
    if surface == "woven":
        period = rng.uniform(5, 9)
        u = (math.cos(a) * xx + math.sin(a) * yy) * 2 * math.pi / period
        v = (-math.sin(a) * xx + math.cos(a) * yy) * 2 * math.pi / period
        over = np.sin(u) * np.sin(v)
        return 1 + 0.12 * np.sign(over) * np.abs(np.cos(u + v)) + 0.02 * blurred_noise(rng, size, 1.0)
    # crystal: Voronoi cells of random brightness.
    n = int(rng.integers(40, 90))
    seeds = rng.uniform(0, size, (n, 2)).astype(np.float32)
    level = rng.uniform(0.85, 1.15, n).astype(np.float32)
    d = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
    return level[np.argmin(d, axis=-1)] + 0.02 * blurred_noise(rng, size, 1.0)


def rotate(points, angle, cx, cy):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def draw_part(rng, size, parts=PARTS, surface="plain"):
    """Returns (RGB float image, part mask (bool), hole centres [(x, y, r)], part name)."""
    part = parts[rng.integers(len(parts))]
    # Background: a brushed conveyor with a light gradient.
    base = rng.uniform(40, 90)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    bg = base + 25 * grad + rng.normal(0, 3, (size, size))
    img = np.stack([bg, bg * rng.uniform(0.95, 1.05), bg * rng.uniform(0.9, 1.1)], -1)

    mask_img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask_img)
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12) * size
    scale = rng.uniform(0.3, 0.4) * size
    rot = rng.uniform(0, 2 * math.pi)
    holes = []
    if part == "washer":
        r = scale
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        hr = r * rng.uniform(0.3, 0.45)
        holes.append((cx, cy, hr))
        colour = np.array([185, 188, 192])
    elif part == "bracket":
        w, h = scale * 1.8, scale * 0.6
        pts = [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
        d.polygon(rotate(pts, rot, cx, cy), fill=255)
        for t in (-0.3, 0.3):
            hx, hy = rotate([(cx + t * w, cy)], rot, cx, cy)[0]
            holes.append((hx, hy, h * 0.22))
        colour = np.array([160, 165, 175])
    elif part == "pcb_pad":
        w = scale * 1.5
        pts = [(cx - w / 2, cy - w / 2), (cx + w / 2, cy - w / 2), (cx + w / 2, cy + w / 2), (cx - w / 2, cy + w / 2)]
        d.polygon(rotate(pts, rot, cx, cy), fill=255)
        for tx, ty in ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)):
            hx, hy = rotate([(cx + tx * w, cy + ty * w)], rot, cx, cy)[0]
            holes.append((hx, hy, w * 0.08))
        colour = np.array([40, 120, 60])
    else:  # bolt_head
        r = scale * 0.95
        pts = [(cx + r * math.cos(rot + k * math.pi / 3), cy + r * math.sin(rot + k * math.pi / 3)) for k in range(6)]
        d.polygon(pts, fill=255)
        holes.append((cx, cy, r * 0.25))
        colour = np.array([150, 150, 155])
    part_mask = np.array(mask_img) > 0
    light = rng.uniform(0.75, 1.2)
    shade = 1 + 0.25 * grad
    metal = colour[None, None, :] * light * shade[..., None] + rng.normal(0, 4, (size, size, 1))
    if surface != "plain":
        metal = metal * texture(rng, surface, size)[..., None]
    img = np.where(part_mask[..., None], metal, img)
    # Holes (and PCB copper pads) drawn over the part.
    hole_mask = Image.new("L", (size, size), 0)
    hd = ImageDraw.Draw(hole_mask)
    for hx, hy, hr in holes:
        hd.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
    hm = np.array(hole_mask) > 0
    if part == "pcb_pad":
        img = np.where(hm[..., None], np.array([200, 150, 70]) * light, img)
    else:
        img = np.where(hm[..., None], img * 0.0 + bg[..., None] * 0.6, img)
        part_mask = part_mask & ~hm
    return img, part_mask, holes, part, colour * light


def draw_defect(rng, img, part_mask, holes, part, metal, kind, size):
    """Draws one defect on the part; returns the new image and the defect mask (bool)."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    ys, xs = np.nonzero(part_mask)
    i = rng.integers(len(xs))
    px, py = float(xs[i]), float(ys[i])
    out = img.copy()
    if kind == "missing_hole" and holes:
        hx, hy, hr = holes[rng.integers(len(holes))]
        d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=255)
        dm = np.array(m) > 0
        fill = np.array([40, 120, 60]) * 1.0 if part == "pcb_pad" else metal
        out = np.where(dm[..., None], fill[None, None, :] + rng.normal(0, 4, (size, size, 1)), out)
        return out, dm
    if kind in ("scratch", "missing_hole"):
        length = rng.uniform(0.15, 0.35) * size
        a = rng.uniform(0, math.pi)
        x2, y2 = px + length * math.cos(a), py + length * math.sin(a)
        d.line([(px, py), (x2, y2)], fill=255, width=max(2, size // 100))
        dm = (np.array(m) > 0) & part_mask
        out = np.where(dm[..., None], np.minimum(out + 80, 255), out)
    elif kind == "dent":
        r = rng.uniform(0.04, 0.08) * size
        d.ellipse([px - r, py - r * 0.7, px + r, py + r * 0.7], fill=255)
        dm = (np.array(m) > 0) & part_mask
        blur = np.array(m.filter(ImageFilter.GaussianBlur(r / 3)), dtype=np.float32) / 255
        out = out * (1 - 0.55 * blur[..., None] * part_mask[..., None])
    elif kind == "crack":
        pts = [(px, py)]
        a = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(5, 9))):
            a += rng.uniform(-0.8, 0.8)
            step = rng.uniform(0.025, 0.05) * size
            pts.append((pts[-1][0] + step * math.cos(a), pts[-1][1] + step * math.sin(a)))
        d.line(pts, fill=255, width=max(2, size // 110))
        dm = (np.array(m) > 0) & part_mask
        out = np.where(dm[..., None], out * 0.2, out)
    else:  # stain
        r = rng.uniform(0.05, 0.09) * size
        for _ in range(4):
            ox, oy = rng.uniform(-r / 2, r / 2, 2)
            d.ellipse([px + ox - r, py + oy - r * 0.8, px + ox + r, py + oy + r * 0.8], fill=255)
        dm = (np.array(m) > 0) & part_mask
        stain = np.array([120, 80, 30], dtype=np.float32)
        out = np.where(dm[..., None], 0.45 * out + 0.55 * stain, out)
    return out, dm


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def answer(kind, box, size):
    if kind == "good":
        return {"verdict": "pass", "defects": []}
    rel = [round(v * 1000 / size) for v in box]
    return {"verdict": "fail", "defects": [{"class": kind, "box": [min(1000, v) for v in rel], "note": ""}]}


def finish(img, rng):
    img = img + rng.normal(0, rng.uniform(1, 6), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--train-good", type=int, default=4, help="good parts under train/good")
    ap.add_argument("--good", type=int, default=20, help="good parts under test/good")
    ap.add_argument("--per-defect", type=int, default=10, help="defective parts per class under test/")
    ap.add_argument("--defects", default=",".join(DEFECTS))
    ap.add_argument("--parts", default=",".join(PARTS), help="part kinds drawn (one kind: a dataset for an anomaly detector)")
    ap.add_argument("--surface", default="plain", choices=SURFACES, help="the parts' surface (mixed: one textured kind per image)")
    a = ap.parse_args()
    parts = [p for p in a.parts.split(",") if p]
    if any(p not in PARTS for p in parts) or not parts:
        ap.error(f"--parts: each of {', '.join(PARTS)}")
    rng = np.random.default_rng(a.seed)
    kinds = [k for k in a.defects.split(",") if k]
    rows = []
    jobs = [("train", "good")] * a.train_good + [("test", "good")] * a.good
    for k in kinds:
        jobs += [("test", k)] * a.per_defect
    counters = {}
    for split, kind in jobs:
        n = counters.get((split, kind), 0)
        counters[(split, kind)] = n + 1
        while True:
            img, part_mask, holes, part, metal = draw_part(rng, a.size, parts, a.surface)
            if kind == "missing_hole" and not holes:
                continue
            dm = None
            if kind != "good":
                img, dm = draw_defect(rng, img, part_mask, holes, part, metal, kind, a.size)
                if dm.sum() < 12:
                    continue
            break
        path = a.out / split / kind / f"{n:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        finish(img, rng).save(path)
        boxes = []
        if dm is not None:
            mp = a.out / "ground_truth" / kind / f"{n:03d}_mask.png"
            mp.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((dm * 255).astype(np.uint8)).save(mp)
            boxes = [box_of(dm)]
        rows.append({
            "image": str(path.relative_to(a.out)), "split": split, "class": kind, "part": part,
            "boxes": boxes, "answer": json.dumps(answer(kind, boxes[0] if boxes else None, a.size), separators=(",", ":")),
        })
    with open(a.out / "labels.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} images in {a.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Trains Loupe's demonstration inspection model: a small Qwen2-VL (the exact architecture Loupe runs)
that answers the verdict JSON of tools/parts_demo_spec.toml for synthetic machined parts.

    /work/venv/bin/python tools/train_inspection_model.py --out models/loupe-parts-demo [--minutes 55]

Everything is seeded; versions are pinned in tools/requirements.txt. Steps:
  1. draw training parts with tools/make_inspection_dataset.py's functions (seed 1000), half good,
     with each defect's mask;
  2. build a byte-level BPE tokenizer with Qwen2-VL's special tokens on the prompt and answer texts;
  3. build the prompt exactly as `loupe inspect` does for the spec (same preamble, same chat template);
  4. train Qwen2VLForConditionalGeneration from scratch on the CPU for --minutes of wall time:
     - first --vision-minutes on the vision tower alone, with auxiliary heads on each merged image
       token: which defect covers it (or none), the defect's box relative to the token's centre (the
       same task at every place in the image, which a tower with only relative positions learns well),
       and whether the image shows a defect at all (the most defect-like token decides): dense
       supervision the answer text alone gives too weakly (a first run on the answer text alone learned
       the format but not the defects: 52.5% verdict accuracy);
     - then the whole model on the answer tokens, keeping the cell head and adding a box head on the
       second decoder layer's image tokens (deep supervision of where the defect is);
     the prompt before the image is the same for every part, so it runs once per step and its keys and
     values are shared by the batch (checked equal to the plain forward at start-up); the vision
     tower trains through a faster path of the same arithmetic (fast_vision_training, checked against
     transformers' forward at start-up) compiled with torch.compile;
  5. save weights (safetensors; the auxiliary heads are dropped), tokenizer, chat template, processor
     config and the spec to --out.
Measure it afterwards with `loupe eval --spec OUT/spec.toml` on a set drawn with another seed.
"""

import argparse
import importlib.util
import json
import math
import random
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

import transformers
from transformers import (
    DynamicCache,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    """Imports a sibling script of tools/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The Qwen2 tokenizer pipeline, special tokens, image normalization and chat template of the fixtures.
fixtures = load_tool("make_fixtures")
mkds = load_tool("make_inspection_dataset")
TEMPLATE, SPECIALS, MEAN, STD = fixtures.TEMPLATE, fixtures.SPECIALS, fixtures.MEAN, fixtures.STD


def preamble(spec: dict) -> str:
    """crates/loupe-inspect/src/spec.rs `Spec::preamble` for the rel1000 convention, character for character."""
    s = spec["instructions"].strip() + "\n\nDefect classes:\n"
    for d in spec["defects"]:
        desc = d.get("description", "").strip()
        s += f"- {d['name']}: {desc}\n" if desc else f"- {d['name']}\n"
    s += ('\nAnswer in JSON: {"verdict": "pass" or "fail", "defects": [{"class", "box": [x1, y1, x2, y2], "note"}]}, '
          "boxes as integers from 0 to 1000 relative to the image width and height, (0,0) at the top left.")
    return s


def messages(spec: dict) -> list:
    content = [{"type": "text", "text": preamble(spec)}, {"type": "text", "text": "\nPart to inspect:"}, {"type": "image"}]
    m = []
    if spec.get("system"):
        m.append({"role": "system", "content": [{"type": "text", "text": spec["system"]}]})
    m.append({"role": "user", "content": content})
    return m


def draw(rng, size, kind):
    """One training part: (image, answer JSON, defect mask or None)."""
    while True:
        img, part_mask, holes, part, metal = mkds.draw_part(rng, size)
        if kind == "missing_hole" and not holes:
            continue
        box, dm = None, None
        if kind != "good":
            img, dm = mkds.draw_defect(rng, img, part_mask, holes, part, metal, kind, size)
            if dm.sum() < 12:
                continue
            box = mkds.box_of(dm)
        return mkds.finish(img, rng), json.dumps(mkds.answer(kind, box, size), separators=(",", ":")), dm


def make_tokenizer(texts) -> Tokenizer:
    tok = fixtures.qwen2_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tok


def patchify(images: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> Qwen2-VL pixel_values (B * grid_h * grid_w, 3 * temporal * patch * patch),
    the image processor's normalization and patch order for images already at their target size (checked
    against the processor at start-up)."""
    b, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    x = x.unsqueeze(1).expand(b, temporal, 3, h, w)
    gh, gw = h // patch, w // patch
    x = x.reshape(b, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(b * gh * gw, 3 * temporal * patch * patch)


def cell_targets(masks: np.ndarray, classes_of: np.ndarray, cell: int) -> np.ndarray:
    """Per merged visual token (cell x cell pixels, raster order): 0 for no defect, else 1 + the class of
    the defect that covers any of its pixels (a thin scratch may cross a cell with one or two)."""
    n, h, w = masks.shape
    counts = masks.reshape(n, h // cell, cell, w // cell, cell).sum((2, 4)).reshape(n, -1)
    return np.where(counts >= 1, classes_of[:, None] + 1, 0)


def cell_origins(size: int, cell: int) -> torch.Tensor:
    """(cells, 4): each merged token's centre as (x, y, x, y) in image fractions, raster order."""
    g = size // cell
    c = (torch.arange(g, dtype=torch.float32) + 0.5) * cell / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x, y, x, y], -1).reshape(-1, 4)


def fast_vision_training(patches_per_image: int):
    """Two of transformers' vision-tower forwards replaced, for training only, by the same arithmetic
    in fewer, larger operations (with torch.compile, warm-up steps 0.22 -> 0.13 s on 2 cores; the
    saved weights are unchanged and the result is checked against the original at start-up):
    the patch embedding's Conv3d, whose kernel equals its stride over already-flattened patches, is
    one matrix product; attention runs as one batched call over images of equal size instead of one
    call per image."""
    import torch.nn.functional as F
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qv

    def patch_embed(self, x):
        w = self.proj.weight
        return F.linear(x.view(-1, w[0].numel()).to(w.dtype), w.view(w.shape[0], -1))

    def attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        s = hidden_states.shape[0]
        assert s % patches_per_image == 0
        q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = qv.apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        b = s // patches_per_image
        q, k, v = (t.view(b, patches_per_image, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(s, -1))

    qv.PatchEmbed.forward = patch_embed
    qv.VisionAttention.forward = attention


class Batches:
    """The training set held in memory as uint8 pixels, token ids and auxiliary targets."""

    def __init__(self, data, size, answer_ids, classes, cell):
        self.images = torch.from_numpy(np.stack([np.asarray(img) for img, _, _ in data]))
        masks = np.stack([dm if dm is not None else np.zeros((size, size), bool) for _, _, dm in data])
        kinds = []
        boxes = np.zeros((len(data), 4), np.float32)
        for i, (_, ans, dm) in enumerate(data):
            d = json.loads(ans)["defects"]
            kinds.append(classes.index(d[0]["class"]) if d else -1)
            if d:
                boxes[i] = np.array(d[0]["box"], np.float32) / 1000.0
        self.kind = np.array(kinds)
        self.cells = torch.from_numpy(cell_targets(masks, np.maximum(self.kind, 0), cell) * (self.kind[:, None] >= 0))
        self.boxes = torch.from_numpy(boxes)
        self.answers = answer_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "loupe-parts-demo")
    ap.add_argument("--spec", type=Path, default=ROOT / "tools" / "parts_demo_spec.toml")
    ap.add_argument("--minutes", type=float, default=53,
                    help="wall-clock budget of the training loop (drawing the data and the checks add ~4 minutes)")
    ap.add_argument("--vision-minutes", type=float, default=25, help="of which: vision tower warm-up on the cell head")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--train-images", type=int, default=100000,
                    help="parts drawn for training; 40,000 (12 passes) left the cell head memorizing: "
                         "100,000 (6 passes) gave 2 points of accuracy and 0.05 of IoU (docs/benchmarks.md)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vision-batch", type=int, default=32, help="batch of the vision warm-up")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary cell and box losses")
    ap.add_argument("--vision-width", type=int, default=128)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--vision-mlp", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verdict-weight", type=float, default=0.0,
                    help="extra loss on the verdict token (the answer's mean over ~40 tokens gives it 1/40); "
                         "1.0 with --hard-fraction 0.25 was tried: verdicts better, boxes worse (docs/benchmarks.md)")
    ap.add_argument("--fail-weight", type=float, default=2.0,
                    help="class weight of 'fail' in that extra loss: a missed defect costs more than overkill")
    ap.add_argument("--hard-fraction", type=float, default=0.0,
                    help="share of each batch replayed from the parts the image-level head found hardest")
    a = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(a.threads)
    spec = tomllib.loads(a.spec.read_text())
    classes = [d["name"] for d in spec["defects"]]
    image = spec.get("image", {})
    assert image.get("min_pixels") == image.get("max_pixels") == a.size * a.size, \
        f"{a.spec}: [image] min_pixels and max_pixels must be {a.size} x {a.size}, the size trained at"

    t0 = time.time()
    rng = np.random.default_rng(1000)
    kinds = ["good"] * len(classes) + classes  # half good, half spread over the defects
    data = [draw(rng, a.size, kinds[i % len(kinds)]) for i in range(a.train_images)]
    print(f"drew {len(data)} training images in {time.time() - t0:.0f} s", flush=True)

    corpus = [preamble(spec), "\nPart to inspect:", "You are a helpful assistant.", "system user assistant"]
    corpus = corpus * 50 + [ans for _, ans, _ in data[:4000]]
    tok = make_tokenizer(corpus)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=4096)
    ip = Qwen2VLImageProcessor(min_pixels=a.size * a.size, max_pixels=a.size * a.size, image_mean=MEAN,
                               image_std=STD, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=fast, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=TEMPLATE)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=tok.get_vocab_size(), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=a.vision_depth, embed_dim=a.vision_width, hidden_size=192,
                           num_heads=a.vision_width // 32, mlp_ratio=a.vision_mlp, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    hidden = cfg.text_config.hidden_size
    print(f"model: {n_params / 1e6:.2f} M parameters, vocab {tok.get_vocab_size()}", flush=True)

    # The prompt is the same for every part (one image of one size): its tokens before the image are run
    # once per step and their keys/values shared by the whole batch; only the image and answer differ.
    prompt = proc.apply_chat_template(messages(spec), tokenize=False, add_generation_prompt=True)
    first = proc(text=[prompt], images=[data[0][0]], return_tensors="pt")
    prompt_ids = first["input_ids"][0]
    assert torch.allclose(first["pixel_values"], patchify(torch.from_numpy(np.asarray(data[0][0]))[None]), atol=1e-5)
    n_img = int((prompt_ids == cfg.image_token_id).sum())
    p_len = int((prompt_ids == cfg.image_token_id).nonzero()[0])
    grid = first["image_grid_thw"]
    eos = ids["<|im_end|>"]
    answers = [tok.encode(ans).ids + [eos] for _, ans, _ in data]
    longest = max(len(x) for x in answers)
    full = torch.cat([prompt_ids, torch.full((longest,), eos)])[None]
    pos, _ = model.model.get_rope_index(full, (full == cfg.image_token_id).int(), grid)
    print(f"prompt {len(prompt_ids)} tokens ({p_len} before the {n_img} image tokens), answers up to {longest}", flush=True)
    pass_ids = tok.encode(json.dumps(mkds.answer("good", None, a.size), separators=(",", ":"))).ids
    fail_ids = next(x for x, (_, _, dm) in zip(answers, data) if dm is not None)
    verdict_at = next(i for i, (p, f) in enumerate(zip(pass_ids, fail_ids)) if p != f)
    train = Batches(data, a.size, answers, classes, 28)
    cell_head = torch.nn.Linear(cfg.vision_config.hidden_size, 1 + len(classes))
    vbox_head = torch.nn.Linear(cfg.vision_config.hidden_size, 4)
    box_head = torch.nn.Linear(hidden, 4)
    origins = cell_origins(a.size, 28)
    lm = model.model.language_model

    # Every training image has the same size: the vision tower's faster training path applies (its
    # output checked against transformers' own forward here), compiled once for the batch shape.
    def encode(pixels, b):
        """The merged image tokens of b training images."""
        return model.model.visual(pixels, grid_thw=grid.repeat(b, 1)).pooler_output

    with torch.no_grad():
        few = patchify(train.images[:3])
        want = encode(few, 3)
        fast_vision_training(int(grid.prod()))
        got = encode(few, 3)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    compiled = torch.compile(encode, dynamic=False)
    cell_weight = torch.tensor([1.0] + [4.0] * len(classes))  # defect tokens are the rare ones
    verdict_class_weight = torch.ones(cfg.text_config.vocab_size)
    verdict_class_weight[fail_ids[verdict_at]] = a.fail_weight
    # Hard-example replay: the image-level loss each part had when last seen (NaN: not seen yet).
    hardness = np.full(len(data), np.nan, np.float32)

    def forward(idx, with_lm=True, fast=True):
        """Loss terms for the samples idx."""
        b = len(idx)
        pixels = patchify(train.images[idx])
        feats = (compiled if fast else encode)(pixels, b).view(b, n_img, -1)
        cells = train.cells[idx]
        scores = cell_head(feats)
        cell_loss = torch.nn.functional.cross_entropy(scores.flatten(0, 1), cells.flatten(), weight=cell_weight)
        terms = {"cell": cell_loss}
        on = cells > 0
        # Image level: the most defect-like token says whether the part is defective.
        defect = torch.logsumexp(scores[..., 1:], -1) - scores[..., 0]
        present = on.any(1)
        found_each = torch.nn.functional.binary_cross_entropy_with_logits(
            defect.max(1).values, present.float(), reduction="none")
        terms["found"] = found_each.mean()
        if on.any():
            rel = train.boxes[idx][:, None, :] - origins[None]
            terms["vbox"] = 10 * torch.nn.functional.smooth_l1_loss(vbox_head(feats)[on], rel[on], beta=0.02)
        with torch.no_grad():  # image-level: does the cell head find a defect where there is one?
            found = (scores.argmax(-1) > 0).any(1)
            metrics = {"found_acc": (found == present).float().mean()}
            hardness[idx] = found_each.detach().numpy()
        if not with_lm:
            return terms, metrics
        cache = DynamicCache(config=model.config)
        lm(inputs_embeds=lm.embed_tokens(prompt_ids[None, :p_len]), position_ids=pos[:, :, :p_len],
           past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(b)
        rest = [prompt_ids[p_len + n_img:].tolist() + train.answers[i] for i in idx]
        width = max(len(r) for r in rest)
        suffix = torch.full((b, width), ids["<|endoftext|>"])
        for j, r in enumerate(rest):
            suffix[j, : len(r)] = torch.tensor(r)
        emb = torch.cat([feats, lm.embed_tokens(suffix)], 1)
        s = emb.shape[1]
        out = lm(inputs_embeds=emb, position_ids=pos[:, :, p_len:p_len + s].expand(3, b, s),
                 past_key_values=cache, use_cache=True, output_hidden_states=True)
        logits = model.lm_head(out.last_hidden_state)
        labels = torch.full((b, s), -100)
        tail = len(prompt_ids) - p_len - n_img
        for j, i in enumerate(idx):
            n = len(train.answers[i])
            labels[j, n_img + tail - 1: n_img + tail - 1 + n] = torch.tensor(train.answers[i])
        terms["lm"] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        # The verdict token decides the part; weighted on its own, with a miss costing more than overkill.
        at = n_img + tail - 1 + verdict_at
        terms["verdict"] = a.verdict_weight * torch.nn.functional.cross_entropy(
            logits[:, at], labels[:, at], weight=verdict_class_weight)
        with torch.no_grad():  # teacher-forced: is the verdict word right?
            metrics["verdict_acc"] = (logits[:, at].argmax(-1) == labels[:, at]).float().mean()
        # Deep supervision: after the second decoder layer, each visual token that shows the defect
        # carries the defect's box (so the later layers can write it out as digits).
        hid = out.hidden_states[2][:, :n_img]
        if on.any():
            want = train.boxes[idx][:, None, :].expand(b, n_img, 4)[on]
            terms["box"] = 10 * torch.nn.functional.smooth_l1_loss(box_head(hid[on]), want, beta=0.02)
        return terms, metrics, logits

    # The shared-prefix forward must equal the plain one.
    with torch.no_grad():
        idx = [0, 1]
        _, _, logits = forward(idx, fast=False)
        for j, i in enumerate(idx):
            seq = torch.cat([prompt_ids, torch.tensor(train.answers[i])])[None]
            ref = model(input_ids=seq, pixel_values=patchify(train.images[[i]]), image_grid_thw=grid,
                        mm_token_type_ids=(seq == cfg.image_token_id).int()).logits[0, p_len:]
            n = ref.shape[0]
            assert torch.allclose(logits[j, :n], ref, atol=1e-4), (logits[j, :n] - ref).abs().max()
    print("shared-prefix forward matches the plain forward", flush=True)

    params = [p for m in (model, cell_head, vbox_head, box_head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget, warm = a.minutes * 60, a.vision_minutes * 60
    start = time.time()
    step, seen, replayed, log = 0, 0, 0, []
    order = np.random.default_rng(0).permutation(len(data))
    model.train()
    # The schedule runs on wall time so the run fits its budget on any machine.
    while True:
        el = time.time() - start
        if el >= budget:
            break
        vision_only = el < warm
        frac = el / budget
        lr = a.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        bsz = a.vision_batch if vision_only else a.batch
        n_hard = int(bsz * a.hard_fraction) if step >= 100 else 0
        fresh = bsz - n_hard
        idx = [int(order[(seen + i) % len(order)]) for i in range(fresh)]
        seen += fresh
        replayed += n_hard
        if n_hard:
            scored = np.flatnonzero(~np.isnan(hardness))
            w = hardness[scored].astype(np.float64) + 1e-3
            idx += [int(i) for i in np.random.default_rng(step).choice(scored, n_hard, replace=False, p=w / w.sum())]
        terms, metrics = forward(idx, with_lm=not vision_only)[:2]
        loss = terms.get("lm", 0) + terms.get("verdict", 0) + a.aux * sum(
            v for k, v in terms.items() if k not in ("lm", "verdict"))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({k: v.item() for k, v in (terms | metrics).items()})
        step += 1
        if step % 25 == 0:
            recent = log[-25:]
            keys = sorted({k for r in recent for k in r})
            parts = " ".join(f"{k} {np.mean([r[k] for r in recent if k in r]):.4f}" for k in keys)
            print(f"step {step} ({el:.0f} s, {seen} samples{', vision warm-up' if vision_only else ''}) {parts} lr {lr:.2e}", flush=True)

    model.eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    proc.save_pretrained(a.out)
    (a.out / "spec.toml").write_text(a.spec.read_text())
    final = {k: float(np.mean([r[k] for r in log[-50:] if k in r])) for k in ("lm", "verdict", "cell", "found", "vbox", "box")}
    (a.out / "training.json").write_text(json.dumps({
        "steps": step, "samples_seen": seen, "samples_replayed": replayed, "train_images": len(data), "minutes": a.minutes,
        "vision_minutes": a.vision_minutes, "batch": a.batch, "vision_batch": a.vision_batch, "lr": a.lr, "aux": a.aux,
        "verdict_weight": a.verdict_weight, "fail_weight": a.fail_weight, "hard_fraction": a.hard_fraction, "final_losses": final,
        "parameters": n_params, "image_size": a.size, "seed": 1000, "torch": torch.__version__,
        "transformers": transformers.__version__,
    }, indent=2))
    # A quick look on fresh parts (the real measurement is `loupe eval`).
    rng = np.random.default_rng(99)
    ok = 0
    for i in range(40):
        kind = kinds[i % len(kinds)]
        img, want, _ = draw(rng, a.size, kind)
        inputs = proc(text=[prompt], images=[img], return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**inputs, max_new_tokens=60, do_sample=False)
        got = proc.tokenizer.decode(g[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ok += json.loads(want)["verdict"] in got[:20]
        if i < 6:
            print(f"  {kind:13s} want {want}\n                got  {got}")
    print(f"verdict right on {ok}/40 fresh parts; saved {a.out}", flush=True)


if __name__ == "__main__":
    main()

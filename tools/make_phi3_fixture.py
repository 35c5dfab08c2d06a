#!/usr/bin/env python3
"""Writes Phi-3's parity fixtures: tiny random Phi3ForCausalLM checkpoints (transformers, pinned) with
a tiny Phi-3-style tokenizer (Llama's SentencePiece BPE: a "\u2581" put before the text, spaces as
"\u2581", byte fallback; Phi-3's turn markers as added tokens), and for each, transformers' outputs
stage by stage: the rendered prompt, its token ids, f32 logits at every position, and 20 greedy
tokens.

    .venv/bin/python tools/make_phi3_fixture.py

Two shapes, so every option Loupe reads is exercised:
  phi3/       as transformers 5 saves it (`rope_parameters`): Phi-4-mini's kind: LongRoPE over 3/4
              of each head (`partial_rotary_factor` 0.75), GQA (4 query heads, 2 key-value heads),
              tied head; a pretrained context of 24 positions out of 128, so the `long` prompt is
              past it (long factors throughout) and the `short` one crosses it while decoding (short
              factors in prefill, long ones from position 24 on, as transformers switches).
  published/  the layout of Microsoft's published Phi-3.5-mini config.json: `rope_scaling` of type
              `longrope` with `original_max_position_embeddings` beside it, `rope_theta`, a
              `sliding_window` of 7 (every prompt runs past it), multi-head attention, untied head.
Writes tests/fixtures/phi3/<name>/ (the checkpoint) and tests/fixtures/phi3/<name>.safetensors.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHARED = load_tool("text_fixtures")
OUT = ROOT / "tests" / "fixtures" / "phi3"

# Llama's specials first (unk 0, bos 1, eos 2), the byte tokens, then Phi-3's added tokens.
BASE = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

# Phi-3.5-mini-instruct's chat template (tokenizer_config.json).
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PROMPTS = {
    "short": [{"role": "user", "content": "Is the weld good?"}],
    "system": [{"role": "system", "content": "You inspect parts."},
               {"role": "user", "content": "Describe the bracket."}],
    "spaces": [{"role": "user", "content": "Part  12 from Müller: is the weld good?"}],
    "long": [{"role": "user", "content": "The scratch on the left bracket runs from the hole to the edge; "
              "the dent beside it is small. List every defect with its box, then the verdict."}],
}

SHAPES = {
    "phi3": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=24,
        tie_word_embeddings=True, partial=0.75, window=None, initializer_range=0.25, seed=31,
    ),
    "published": dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=3, max_position_embeddings=128, original_max_position_embeddings=24,
        tie_word_embeddings=False, partial=1.0, window=7, initializer_range=0.25, seed=35,
    ),
}


def tiny_tokenizer() -> Tokenizer:
    """A Phi-3-style tokenizer trained on inspection sentences: Llama's SentencePiece BPE layout."""
    corpus = SHARED.corpus(7)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=BASE + BYTES,
                                  limit_alphabet=80)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BASE])
    # Phi-3's markers: added, special, and `rstrip` as published, so the newline after them stays.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True, rstrip=False) for t in ADDED])
    return tok


def longrope_factors(n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    short = (1.0 + rng.random(n) * 0.5).round(4).tolist()
    long = (1.0 + np.linspace(0, 1, n) ** 2 * 30 + rng.random(n)).round(4).tolist()
    return short, long


def as_published(d: Path) -> None:
    """Rewrites a saved config.json in the layout of Microsoft's published Phi-3.5-mini config."""
    p = d / "config.json"
    c = json.loads(p.read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope["rope_theta"]
    c["rope_scaling"] = {"long_factor": rope["long_factor"], "short_factor": rope["short_factor"],
                         "type": "longrope"}
    p.write_text(json.dumps(c, indent=2) + "\n")


def main() -> None:
    tok = tiny_tokenizer()
    ids = {s: tok.token_to_id(s) for s in BASE + ADDED}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, shape in SHAPES.items():
        shape = dict(shape)
        torch.manual_seed(shape.pop("seed"))
        partial, window = shape.pop("partial"), shape.pop("window")
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        short, long = longrope_factors(int(head_dim * partial) // 2, len(name))
        rope = {"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": partial,
                "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": shape["original_max_position_embeddings"]}
        cfg = Phi3Config(vocab_size=tok.get_vocab_size(), bos_token_id=ids["<s>"],
                         eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters=rope, sliding_window=window, **shape)
        model = Phi3ForCausalLM(cfg).eval()
        with torch.no_grad():  # norms away from ones
            for pname_, p in model.named_parameters():
                if pname_.endswith("norm.weight"):
                    p.copy_(1.0 + torch.randn_like(p) * 0.3)
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.generation_config.do_sample = False
        model.save_pretrained(d)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=128)
        fast.chat_template = TEMPLATE
        fast.save_pretrained(d)
        if name == "published":
            as_published(d)
            model = AutoModelForCausalLM.from_pretrained(d).eval()
            assert model.config.rope_parameters["rope_type"] == "longrope", model.config.rope_parameters
        tensors, meta = {}, {"prompts": {}}
        for pname, msgs in PROMPTS.items():
            text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            SHARED.reference(model, fast, text, f"{name}/{pname}", f"{pname}/", tensors)
            meta["prompts"][pname] = {"messages": msgs, "rendered": text}
            n = len(tensors[f"{pname}/ids"])
            print(name, pname, n, "tokens:", repr(fast.decode(tensors[f"{pname}/greedy"])))
        n_short = len(tensors["short/ids"])
        assert n_short <= cfg.original_max_position_embeddings < n_short + 20, "short must cross while decoding"
        assert len(tensors["long/ids"]) > cfg.original_max_position_embeddings, "long must start past it"
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"meta": json.dumps(meta)})
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}: {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

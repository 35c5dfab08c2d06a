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

`phi3` is also written as llama.cpp's converter lays out a Phi-3 GGUF (with the `gguf` package,
pinned; the keys, tensor names and vocabulary as its `Phi3MiniModel` writes them):
  phi3.gguf        f32: fused `attn_qkv` and `ffn_up` (gate rows first), the LongRoPE factors as the
                   tensors `rope_factors_long`/`rope_factors_short`, the rotary width as
                   `rope.dimension_count`, the pretrained context as `rope.scaling.original_context_length`;
                   a SentencePiece vocabulary with no merges and scores that are not in id order (so
                   the merges must follow the scores). Reference `gguf/<prompt>/{ids,logits,greedy}`:
                   the ids from transformers' own tokenizer for Phi-3 GGUFs
                   (`AutoTokenizer.from_pretrained(gguf_file=)`), the outputs from the checkpoint (transformers
                   reads neither LongRoPE nor the partial rotary from a GGUF).
  phi3-mixed.gguf  every matrix block-quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in turn; a matrix whose rows
                   are an odd number of blocks in Q4_0 or Q5_1); reference `mixed/<prompt>/logits` from
                   transformers on the weights as the `gguf` package dequantizes them.
"""

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

assert transformers.__version__ == "5.23.0", transformers.__version__
assert importlib.metadata.version("gguf") == "0.17.1", importlib.metadata.version("gguf")

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


MIXED = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0,
         gguf.GGMLQuantizationType.Q5_1, gguf.GGMLQuantizationType.Q8_0]
# candle's own Q4_1, Q5_0 and Q8_0 products want an even number of blocks per row.
ODD_BLOCKS = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_1]


def llama_cpp_name(hf: str) -> str:
    """llama.cpp's converter's name for a Phi-3 tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[part]}.{kind}"


def gguf_scores(tokens: list[str], rng) -> list[float]:
    """SentencePiece scores as a Phi-3 file has them: 0 for control and byte pieces, -1000 for the
    added markers, and for the others their rank, shuffled within runs of 16 so the order of the
    scores is not the order of the ids."""
    rank = [float(-i) for i in range(len(tokens))]
    normal = [i for i, t in enumerate(tokens) if t not in BASE + BYTES + ADDED]
    for at in range(0, len(normal), 16):
        run = normal[at:at + 16]
        for a, b in zip(run, rng.permutation(run)):
            rank[a] = float(-b)
    return [0.0 if t in BASE + BYTES else -1000.0 if t in ADDED else rank[i] for i, t in enumerate(tokens)]


def write_gguf(path: Path, cfg, model, tok: Tokenizer, mixed: bool) -> dict:
    """The model as llama.cpp's converter writes a Phi-3 GGUF; returns the state dict as the file
    holds it (matrices dequantized)."""
    rope = cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rot = int(rope.get("partial_rotary_factor", 1.0) * cfg.hidden_size) // cfg.num_attention_heads
    orig = rope["original_max_position_embeddings"]
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(rot)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_file_type(0)
    w.add_sliding_window(cfg.sliding_window or 0)
    scale = cfg.max_position_embeddings / orig
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    assert len(rope["long_factor"]) == rot // 2 and head_dim > rot
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.UNKNOWN if t == "<unk>" else gguf.TokenType.CONTROL if t in BASE + ADDED
             else gguf.TokenType.BYTE if t in BYTES else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(gguf_scores(tokens, np.random.default_rng(5)))
    w.add_token_types(types)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(TEMPLATE)
    w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    held, k = {}, 0
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if mixed and a.ndim == 2:
            q = MIXED[k % len(MIXED)] if (a.shape[1] // 32) % 2 == 0 else ODD_BLOCKS[k % len(ODD_BLOCKS)]
            k += 1
            blocks = gguf.quants.quantize(a, q)
            w.add_tensor(llama_cpp_name(hf), blocks, raw_shape=blocks.shape, raw_dtype=q)
            a = gguf.quants.dequantize(blocks, q)
        else:
            w.add_tensor(llama_cpp_name(hf), np.ascontiguousarray(a))
        held[hf] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if cfg.tie_word_embeddings:
        held["lm_head.weight"] = held["model.embed_tokens.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


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
        if name == "phi3":
            write_gguf(OUT / "phi3.gguf", cfg, model, tok, False)
            held = write_gguf(OUT / "phi3-mixed.gguf", cfg, model, tok, True)
            dequantized = Phi3ForCausalLM(cfg).eval()
            dequantized.load_state_dict(held)
            # transformers' own tokenizer for a Phi-3 GGUF: merges rebuilt from the scores.
            gfast = AutoTokenizer.from_pretrained(str(OUT), gguf_file="phi3.gguf")
            differ = 0
            for pname in PROMPTS:
                text = meta["prompts"][pname]["rendered"]
                inp = SHARED.reference(model, gfast, text, f"{name}/gguf/{pname}", f"gguf/{pname}/", tensors)
                with torch.no_grad():
                    tensors[f"mixed/{pname}/logits"] = dequantized(**inp).logits[0].float().contiguous()
                same = tensors[f"gguf/{pname}/ids"].tolist() == tensors[f"{pname}/ids"].tolist()
                differ += not same
                print(name, "gguf", pname, len(inp["input_ids"][0]), "tokens", "(same ids)" if same else "(other ids)")
            assert differ, "the GGUF's scores change no prompt's ids; swap more"
        n_short = len(tensors["short/ids"])
        assert n_short <= cfg.original_max_position_embeddings < n_short + 20, "short must cross while decoding"
        assert len(tensors["long/ids"]) > cfg.original_max_position_embeddings, "long must start past it"
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"meta": json.dumps(meta)})
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}: {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

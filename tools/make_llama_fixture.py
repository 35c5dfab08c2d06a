#!/usr/bin/env python3
"""Writes the Llama family's parity fixtures: tiny random LlamaForCausalLM checkpoints (transformers,
pinned) and, for each, transformers' outputs stage by stage: the rendered prompt, its token ids, f32
logits at every position, and 20 greedy tokens.

    .venv/bin/python tools/make_llama_fixture.py

Two shapes, so every option Loupe reads is exercised:
  llama3/  Llama 3.x: GQA (4 query heads, 2 key-value heads), RoPE scaled by `rope_type: llama3`
           with an original context of 32 tokens, untied head, no biases. One prompt is longer than
           the original context, so the scaled frequencies are checked past it.
  linear/  SmolLM2-like: multi-head, tied head, `rope_type: linear` (factor 2), q/k/v/o and MLP biases
           (`attention_bias`, `mlp_bias`), an explicit `head_dim`.
Writes tests/fixtures/llama/<name>/ (the checkpoint) and tests/fixtures/llama/<name>.safetensors (the
reference: `<prompt>/ids`, `<prompt>/logits`, `<prompt>/greedy`; prompts and texts in the metadata).

Each checkpoint is also written as llama.cpp's converter lays out a Llama GGUF (with the `gguf` package,
llama.cpp's own writer, pinned in tools/requirements.txt): its tensor names, q and k rows permuted into
llama.cpp's rotary order, llama3 scaling as `rope_freqs.weight`, linear as `llama.rope.scaling.*`, and
the tokenizer with the pre-tokenizer of a published file (`llama3`: `llama-bpe`, `linear`: `smollm`):
  <name>.gguf       f32; reference `gguf/<prompt>/{ids,logits,greedy}`: transformers on the ids that
                    pre-tokenizer gives
  llama3-mixed.gguf every matrix block-quantized, one GGML type per matrix (Q4_0, Q4_1, Q5_0, Q5_1,
                    Q8_0 in turn); reference `mixed/<prompt>/logits`: transformers with the weights
                    dequantized by the `gguf` package
"""

import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "llama"

# Llama 3's chat template, cut to what these prompts use (string contents).
TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROMPTS = {
    "short": [{"role": "user", "content": "Is there a defect? Answer in JSON."}],
    "system": [{"role": "system", "content": "You inspect parts."},
               {"role": "user", "content": "Describe the bracket."}],
    "digits": [{"role": "user", "content": "Part 12345 has 3 dents at x=120, y=7; is it 1 pass or 2 fail?"}],
    "long": [{"role": "user", "content": "The scratch on the left bracket runs from the hole to the edge; "
              "the dent beside it is small. List every defect with its box, then the verdict."}],
}

SHAPES = {
    "llama3": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        initializer_range=0.25, seed=11,
    ),
    "linear": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        initializer_range=0.25, seed=12,
    ),
}


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The pre-tokenizers of the published files each GGUF stands for, as their tokenizer.json has them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {"llama3": "llama-bpe", "linear": "smollm"}
MIXED = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0,
         gguf.GGMLQuantizationType.Q5_1, gguf.GGMLQuantizationType.Q8_0]


def with_pre(tok, pre: str):
    """A copy of `tok` with the pre-tokenizer (and normalizer) of a published `tokenizer.ggml.pre`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, Regex
    t = Tokenizer.from_str(tok.to_str())
    t.normalizer = normalizers.Sequence([])
    if pre == "llama-bpe":
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # smollm: each digit alone, then GPT-2's split
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return t


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q and k: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_divisors(cfg) -> list:
    """What llama.cpp's converter stores as `rope_freqs.weight`: each frequency's llama3 divisor."""
    r = cfg.rope_parameters
    hd = cfg.head_dim
    base, factor = r["rope_theta"], r["factor"]
    lo, hi, old = r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * base ** (i / hd)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def write_gguf(path: Path, name: str, cfg, model, tok, eos: int, bos: int, mixed: bool) -> dict:
    """The model as a llama.cpp Llama GGUF; returns the state dict as the file holds it (dequantized)."""
    # llama.cpp's converter names Llama's tensors as it does Qwen2's.
    llama_cpp_name = load_tool("make_gguf_fixture").llama_name
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(0)
    if cfg.rope_parameters["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_parameters["factor"])
    vocab = json.loads(tok.to_str())
    tokens = [None] * tok.get_vocab_size()
    for t, i in vocab["model"]["vocab"].items():
        tokens[i] = t
    for t in vocab["added_tokens"]:
        tokens[t["id"]] = t["content"]
    specials = {t["content"] for t in vocab["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE[name])
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["model"]["merges"]])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    if cfg.rope_parameters["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", np.array(llama3_divisors(cfg), dtype=np.float32))
    held, k = {}, 0
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the converter writes no output.weight
        a = t.float().numpy()
        heads = None
        if ".q_proj." in hf:
            heads = cfg.num_attention_heads
        elif ".k_proj." in hf:
            heads = cfg.num_key_value_heads
        stored = interleave(a, heads) if heads else a
        if mixed and a.ndim == 2:
            q = MIXED[k % len(MIXED)]
            k += 1
            blocks = gguf.quants.quantize(stored, q)
            w.add_tensor(llama_cpp_name(hf), blocks, raw_shape=blocks.shape, raw_dtype=q)
            a = gguf.quants.dequantize(blocks, q)
            if heads:  # back to transformers' row order
                a = a.reshape(heads, 2, -1, *a.shape[1:])
                a = a.reshape(heads, a.shape[2], 2, *a.shape[3:]).swapaxes(1, 2).reshape(t.shape)
        else:
            w.add_tensor(llama_cpp_name(hf), np.ascontiguousarray(stored))
        held[hf] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if cfg.tie_word_embeddings:
        held["lm_head.weight"] = held["model.embed_tokens.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def main() -> None:
    fixtures = load_tool("make_fixtures")
    reference = load_tool("text_fixtures").reference
    tok = fixtures.tiny_tokenizer()
    ids = {s: tok.token_to_id(s) for s in fixtures.SPECIALS}
    for name, shape in SHAPES.items():
        shape = dict(shape)
        torch.manual_seed(shape.pop("seed"))
        cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=ids["<|endoftext|>"],
                          eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **shape)
        model = LlamaForCausalLM(cfg).eval()
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.generation_config.do_sample = False
        model.save_pretrained(d)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", model_max_length=256)
        fast.chat_template = TEMPLATE
        fast.save_pretrained(d)

        tensors, meta = {}, {"prompts": {}}
        for pname, msgs in PROMPTS.items():
            text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            inp = reference(model, fast, text, f"{name}/{pname}", f"{pname}/", tensors)
            meta["prompts"][pname] = {"messages": msgs, "rendered": text}
            print(name, pname, len(tensors[f"{pname}/ids"]), "tokens:",
                  repr(fast.decode(tensors[f"{pname}/greedy"])))
        # The GGUFs: the same model under a published pre-tokenizer, then block-quantized.
        gtok = with_pre(tok, GGUF_PRE[name])
        gfast = PreTrainedTokenizerFast(tokenizer_object=gtok, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
        write_gguf(OUT / f"{name}.gguf", name, cfg, model, gtok, ids["<|im_end|>"], ids["<|endoftext|>"], False)
        dequantized = None
        if cfg.hidden_size % 32 == 0 and cfg.intermediate_size % 32 == 0:  # whole blocks of 32
            held = write_gguf(OUT / f"{name}-mixed.gguf", name, cfg, model, gtok, ids["<|im_end|>"],
                              ids["<|endoftext|>"], True)
            dequantized = LlamaForCausalLM(cfg).eval()
            dequantized.load_state_dict(held)
        for pname, msgs in PROMPTS.items():
            text = meta["prompts"][pname]["rendered"]
            inp = reference(model, gfast, text, f"{name}/gguf/{pname}", f"gguf/{pname}/", tensors)
            if dequantized is not None:
                with torch.no_grad():
                    tensors[f"mixed/{pname}/logits"] = dequantized(**inp).logits[0].float().contiguous()
            same = tensors[f"gguf/{pname}/ids"].tolist() == tensors[f"{pname}/ids"].tolist()
            print(name, "gguf", pname, len(inp["input_ids"][0]), "tokens", "(same ids)" if same else "(other ids)")
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"meta": json.dumps(meta)})
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}: {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

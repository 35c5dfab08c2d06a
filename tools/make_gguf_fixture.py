#!/usr/bin/env python3
"""Writes the GGUF loader's fixture: a tiny random Qwen2 language model (text only), both as a
transformers checkpoint and as a llama.cpp GGUF file with llama.cpp's tensor names and metadata, plus
transformers' greedy answers for a few chat prompts.

    .venv/bin/python tools/make_gguf_fixture.py --gguf-py LLAMA_CPP/gguf-py

`--gguf-py` is llama.cpp's own GGUF writer library (the `gguf-py` folder of a llama.cpp tree, e.g. the
one vendored in the `llama-cpp-python` sdist); it is used, not copied. Writes tests/fixtures/qwen2_text/:
  tiny/            config.json, model.safetensors, tokenizer.json, tokenizer_config.json (chat template)
  tiny.gguf        the same weights (f32) and tokenizer, as llama.cpp's converter lays out a qwen2 model
  reference.json   for each prompt: the rendered text, its token ids and 20 greedy tokens (transformers)
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "qwen2_text"

# The text-only Qwen2.5 chat template (content is a string).
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROMPTS = [
    [{"role": "user", "content": "Is there a defect? Answer in JSON."}],
    [{"role": "system", "content": "You inspect parts."}, {"role": "user", "content": "Describe the bracket."}],
]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_name(hf: str) -> str:
    """transformers' names to llama.cpp's (the converter's mapping for qwen2)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    layer, rest = parts[2], ".".join(parts[3:-1])
    kind = parts[-1]
    name = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}[rest]
    return f"blk.{layer}.{name}.{kind}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-py", required=True, type=Path)
    a = ap.parse_args()
    sys.path.insert(0, str(a.gguf_py))
    import gguf  # llama.cpp's writer

    fixtures = load_tool("make_fixtures")
    torch.manual_seed(5)
    tok = fixtures.tiny_tokenizer()
    ids = {s: tok.token_to_id(s) for s in fixtures.SPECIALS}
    cfg = Qwen2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        initializer_range=0.25, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    model = Qwen2ForCausalLM(cfg).eval()
    d = OUT / "tiny"
    d.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.do_sample = False
    model.save_pretrained(d)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=4096)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(d)

    # The GGUF: llama.cpp's metadata keys and tensor names; tokens as the byte-level strings.
    w = gguf.GGUFWriter(str(OUT / "tiny.gguf"), "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(0)  # all f32
    vocab = json.loads(tok.to_str())
    tokens = [None] * tok.get_vocab_size()
    for t, i in vocab["model"]["vocab"].items():
        tokens[i] = t
    for t in vocab["added_tokens"]:
        tokens[t["id"]] = t["content"]
    types = [gguf.TokenType.CONTROL if t in fixtures.SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["model"]["merges"]])
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp's converter writes no output.weight
        w.add_tensor(llama_name(name), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = []
    for msgs in PROMPTS:
        text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inp = fast(text, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**inp, max_new_tokens=20, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        new = g.sequences[0, inp["input_ids"].shape[1]:].tolist()
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in g.scores]
        assert min(margins) > 1e-3, f"near tie in the greedy answer ({min(margins)}); change the seed"
        ref.append({"messages": msgs, "rendered": text, "ids": inp["input_ids"][0].tolist(), "greedy": new,
                    "text": fast.decode(new, skip_special_tokens=True)})
        print(repr(ref[-1]["text"]))
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}: {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

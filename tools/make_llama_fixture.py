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
"""

import importlib.util
import json
from pathlib import Path

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


def main() -> None:
    fixtures = load_tool("make_fixtures")
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
            inp = fast(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                logits = model(**inp).logits[0].float()
                g = model.generate(**inp, max_new_tokens=20, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, eos_token_id=None)
            new = g.sequences[0, inp["input_ids"].shape[1]:]
            margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in g.scores]
            assert min(margins) > 1e-3, f"{name}/{pname}: near tie ({min(margins)}); change the seed"
            tensors[f"{pname}/ids"] = inp["input_ids"][0].to(torch.int64).contiguous()
            tensors[f"{pname}/logits"] = logits.contiguous()
            tensors[f"{pname}/greedy"] = new.to(torch.int64).contiguous()
            meta["prompts"][pname] = {"messages": msgs, "rendered": text}
            print(name, pname, len(tensors[f"{pname}/ids"]), "tokens:", repr(fast.decode(new)))
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={"meta": json.dumps(meta)})
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(OUT)}: {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

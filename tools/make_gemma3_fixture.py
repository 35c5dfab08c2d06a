#!/usr/bin/env python3
"""Writes Gemma 3's parity fixtures: tiny random Gemma3ForCausalLM checkpoints (transformers, pinned)
with a tiny Gemma-style tokenizer (SentencePiece BPE: spaces as "\u2581", byte fallback), and for each,
transformers' outputs stage by stage: the rendered prompt, its token ids, f32 logits at every
position, and 20 greedy tokens.

    .venv/bin/python tools/make_gemma3_fixture.py

Two shapes, so every option Loupe reads is exercised:
  gemma3/     as transformers 5 saves it: `rope_parameters` by layer type (the full layers' scaled
              `linear`, factor 4), `layer_types` written out (every sixth layer full), a window of 8
              positions, tied head, GQA (4 query heads, 2 key-value heads).
  published/  the layout of Google's published config.json: `rope_theta`, `rope_local_base_freq`,
              `rope_scaling: null`, `sliding_window_pattern` 3 instead of `layer_types`, a window of
              6, `query_pre_attn_scalar` 24 (not the head width), `final_logit_softcapping` 3, an
              `attn_logit_softcapping` that Gemma 3 ignores, untied head, one key-value head.
Every norm weight is random (transformers starts them at zero, where `1 + w` would hide a missing
`1 +`). Every prompt runs past the window, so the sliding layers hide keys in prefill and in decode.

`gemma3` is also written as llama.cpp's converter lays out a Gemma 3 GGUF (with the `gguf` package,
llama.cpp's own writer, pinned in tools/requirements.txt): its tensor names, every norm weight stored
as `1 + w`, the vocabulary as a SentencePiece list with no merges and runs of spaces stored as spaces,
and no chat template (as the published 270M file):
  gemma3.gguf        f32; reference `gguf/<prompt>/{ids,logits,greedy}`: the ids are transformers'
                     own tokenizer for Gemma GGUFs (`AutoTokenizer.from_pretrained(gguf_file=)`)
  gemma3-mixed.gguf  every matrix block-quantized, one GGML type per matrix (Q4_0, Q4_1, Q5_0, Q5_1,
                     Q8_0 in turn); reference `mixed/<prompt>/logits`: transformers with the weights
                     dequantized by the `gguf` package
Writes tests/fixtures/gemma3/<name>/ (the checkpoint) and tests/fixtures/gemma3/<name>.safetensors.
"""

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig
from transformers import PreTrainedTokenizerFast

assert transformers.__version__ == "5.23.0", transformers.__version__

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHARED = load_tool("text_fixtures")
OUT = ROOT / "tests" / "fixtures" / "gemma3"

# Gemma's specials in Gemma's order (pad 0, eos 1, bos 2, unk 3, mask 4), then its turn markers.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]

# Gemma 3's chat template (google/gemma-3-4b-it, tokenizer_config.json).
TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

PROMPTS = {
    "short": [{"role": "user", "content": "Is there a defect? Answer in JSON."}],
    "system": [{"role": "system", "content": "You inspect parts."},
               {"role": "user", "content": "Describe the bracket."}],
    # Two spaces (Gemma has tokens for runs of spaces) and letters the vocabulary lacks (byte fallback).
    "spaces": [{"role": "user", "content": "Part  12 from Müller:  is the weld good?"}],
    "long": [{"role": "user", "content": "The scratch on the left bracket runs from the hole to the edge; "
              "the dent beside it is small. List every defect with its box, then the verdict."}],
}

SHAPES = {
    "gemma3": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        max_position_embeddings=512, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        initializer_range=0.25, seed=21,
    ),
    "published": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        max_position_embeddings=512, tie_word_embeddings=False, final_logit_softcapping=3.0,
        attn_logit_softcapping=50.0, sliding_window_pattern=3,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        initializer_range=0.25, seed=24,
    ),
}

MIXED = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0,
         gguf.GGMLQuantizationType.Q5_1, gguf.GGMLQuantizationType.Q8_0]


def tiny_tokenizer() -> Tokenizer:
    """A Gemma-style tokenizer trained on inspection sentences: BPE over whole lines (no
    pre-tokenizer split, so merges may cross spaces, as Gemma's do), byte fallback."""
    corpus = SHARED.corpus(5, double_spaces=True)
    corpus += ["Is there a defect? Answer in JSON: {\"verdict\": \"pass\"}", "You inspect parts.\n\n"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False, special_tokens=SPECIALS + BYTES,
                                  limit_alphabet=80)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tok


def randomize_norms(model) -> None:
    """Norm weights away from transformers' zeros, so `1 + w` shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)


def llama_cpp_name(hf: str) -> str:
    """llama.cpp's converter's name for a Gemma 3 tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    rest = hf.removeprefix("model.layers.")
    layer, rest = rest.split(".", 1)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[part]}.{kind}"


def write_gguf(path: Path, cfg, model, tok: Tokenizer, mixed: bool) -> dict:
    """The model as a llama.cpp Gemma 3 GGUF; returns the state dict as the file holds it, in the
    checkpoint's terms (norms as `w`, matrices dequantized)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    full = cfg.rope_parameters["full_attention"]
    w.add_rope_freq_base(full["rope_theta"])
    if full["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    w.add_sliding_window(cfg.sliding_window)
    w.add_file_type(0)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    rng = np.random.default_rng(3)
    types = []
    for t in tokens:
        if t == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif t in SPECIALS:
            types.append(gguf.TokenType.CONTROL)
        elif t in BYTES:
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    # As llama.cpp's converter writes Gemma's vocabulary: runs of spaces as spaces.
    stored = [" " * len(t) if len(t) > 1 and set(t) == {"\u2581"} else t for t in tokens]
    assert stored != tokens, "the tokenizer has no token of two spaces; change the corpus"
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(stored)
    # Scores that do not follow the merge order, as Gemma's do not: the order in the file is what counts.
    w.add_token_scores(rng.standard_normal(len(tokens)).astype(np.float32).tolist())
    w.add_token_types(types)
    w.add_bos_token_id(vocab["<bos>"])
    w.add_eos_token_id(vocab["<eos>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_pad_token_id(vocab["<pad>"])
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    held, k = {}, 0
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if hf.endswith("norm.weight"):
            w.add_tensor(llama_cpp_name(hf), a + 1.0)  # the converter stores Gemma's norms as 1 + w
        elif mixed and a.ndim == 2:
            q = MIXED[k % len(MIXED)]
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


def as_published(d: Path, pattern: int) -> None:
    """Rewrites a saved config.json in the layout of Google's published Gemma 3 configs."""
    p = d / "config.json"
    c = json.loads(p.read_text())
    rope = c.pop("rope_parameters")
    c.pop("layer_types")
    c.pop("_sliding_window_pattern", None)
    c["rope_theta"] = rope["full_attention"]["rope_theta"]
    c["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    c["rope_scaling"] = None
    c["sliding_window_pattern"] = pattern
    p.write_text(json.dumps(c, indent=2) + "\n")


def main() -> None:
    tok = tiny_tokenizer()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, shape in SHAPES.items():
        shape = dict(shape)
        torch.manual_seed(shape.pop("seed"))
        pattern = shape.pop("sliding_window_pattern", 6)
        cfg = Gemma3TextConfig(vocab_size=tok.get_vocab_size(), bos_token_id=ids["<bos>"],
                               eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"],
                               sliding_window_pattern=pattern, **shape)
        model = Gemma3ForCausalLM(cfg).eval()
        randomize_norms(model)
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        model.generation_config.do_sample = False
        model.save_pretrained(d)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", unk_token="<unk>", model_max_length=512)
        fast.chat_template = TEMPLATE
        fast.save_pretrained(d)
        if name == "published":
            as_published(d, pattern)
            reloaded = AutoModelForCausalLM.from_pretrained(d).eval()
            assert reloaded.config.layer_types == cfg.layer_types, reloaded.config.layer_types
            model = reloaded
        print(name, "layers:", cfg.layer_types)

        tensors, meta = {}, {"prompts": {}}
        for pname, msgs in PROMPTS.items():
            text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            SHARED.reference(model, fast, text, f"{name}/{pname}", f"{pname}/", tensors, cfg.sliding_window)
            meta["prompts"][pname] = {"messages": msgs, "rendered": text}
            print(name, pname, len(tensors[f"{pname}/ids"]), "tokens:",
                  repr(fast.decode(tensors[f"{pname}/greedy"])))
        if name == "gemma3":
            write_gguf(OUT / "gemma3.gguf", cfg, model, tok, False)
            held = write_gguf(OUT / "gemma3-mixed.gguf", cfg, model, tok, True)
            dequantized = Gemma3ForCausalLM(cfg).eval()
            dequantized.load_state_dict(held)
            # transformers' own tokenizer for a Gemma GGUF: merges rebuilt from the vocabulary.
            gfast = AutoTokenizer.from_pretrained(str(OUT), gguf_file="gemma3.gguf")
            for pname in PROMPTS:
                text = meta["prompts"][pname]["rendered"]
                inp = SHARED.reference(model, gfast, text, f"{name}/gguf/{pname}", f"gguf/{pname}/", tensors,
                                       cfg.sliding_window)
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

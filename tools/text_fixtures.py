"""What the text-family fixture tools share (tools/make_llama_fixture.py, make_gemma3_fixture.py,
make_phi3_fixture.py): transformers' reference outputs for one prompt, and the inspection sentences
their tiny tokenizers are trained on. Imported by path; not a tool of its own."""

import numpy as np
import torch

WORDS = (
    "the a an of to in is it on for with this that part describe what where which scratch dent crack "
    "hole weld washer bracket bolt good bad defect pass fail box left right top edge corner there are "
    "two one see shows metal plastic board line inspect report answer yes no please about these from"
).split()


def corpus(seed: int, double_spaces: bool = False) -> list[str]:
    """3,000 short inspection sentences drawn from WORDS, each ending in a mark and a number; with
    `double_spaces`, one in seven joins its words with two spaces."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3000):
        n = int(rng.integers(3, 12))
        gap = ("  " if rng.random() < 0.15 else " ") if double_spaces else " "
        s = gap.join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))
        out.append(s.capitalize() + rng.choice([".", "?", "!", ",", ":", ";"]) + " " + str(int(rng.integers(0, 100))))
    return out


def reference(model, fast, text: str, what: str, prefix: str, tensors: dict, longer_than: int = 0):
    """transformers on `text`: its ids, f32 logits at every position and 20 greedy tokens, stored
    under `prefix` in `tensors` (greedy steps must not be near-ties; the prompt must be longer than
    `longer_than` tokens); returns the model inputs."""
    inp = fast(text, return_tensors="pt", add_special_tokens=False)
    assert inp["input_ids"].shape[1] > longer_than, f"{what}: not longer than {longer_than} tokens"
    with torch.no_grad():
        logits = model(**inp).logits[0].float()
        g = model.generate(**inp, max_new_tokens=20, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, eos_token_id=None)
    new = g.sequences[0, inp["input_ids"].shape[1]:]
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in g.scores]
    assert min(margins) > 1e-3, f"{what}: near tie ({min(margins)}); change the seed"
    tensors[f"{prefix}ids"] = inp["input_ids"][0].to(torch.int64).contiguous()
    tensors[f"{prefix}logits"] = logits.contiguous()
    tensors[f"{prefix}greedy"] = new.to(torch.int64).contiguous()
    return inp

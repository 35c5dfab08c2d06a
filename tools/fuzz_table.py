#!/usr/bin/env python3
"""Prints the fuzzing table of docs/reliability.md from fuzz/runs.tsv (every run of tools/fuzz.sh):
per target, the total time run, the inputs executed, and the crashes found (and fixed)."""
import collections
import pathlib

runs = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "runs.tsv"
total = collections.defaultdict(lambda: [0, 0, 0, []])
for line in runs.read_text().splitlines():
    day, target, seconds, execs, result = line.split("\t")
    t = total[target]
    t[0] += int(seconds)
    t[1] += int(execs) if execs.isdigit() else 0
    if result != "ok":
        t[2] += 1
        t[3].append(result)
print("| target | parser | total time | inputs executed | crashes found | open |")
print("|---|---|---|---|---|---|")
what = {
    "config": "config.json / preprocessor / generation config of every family",
    "gguf": "GGUF header walk, candle's parser, metadata to config, tokenizer, template",
    "http": "loupe serve's request bodies (chat JSON, inspection JSON and multipart, history query) through the router and model thread",
    "image": "image decode (header bound first), resize, normalize, patchify",
    "json_schema": "a --json-schema compiled to a token constraint (llguidance)",
    "safetensors": "safetensors header, offsets, every tensor read",
    "spec": "inspection spec TOML",
    "template": "chat template parse and render (fuel, output bound)",
    "tokenizer": "tokenizer.json, encode, decode",
}
for target in sorted(total):
    secs, execs, crashes, notes = total[target]
    found = f"{crashes} ({'; '.join(notes)})" if crashes else "0"
    still_open = sum(1 for n in notes if "fixed" not in n)
    print(f"| `{target}` | {what.get(target, '')} | {secs / 60:.1f} min | {execs:,} | {found} | {still_open} |")

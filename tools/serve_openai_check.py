"""Drives `loupe serve` with the official `openai` client (pinned in tools/requirements-serve.txt).

Checks, against a server already running: the answer to an image and a prompt equals --expect
(what `loupe run --temperature 0` printed), plain and streamed; usage is reported; a json_schema
answer parses and keeps to the schema; an unknown model is an openai.NotFoundError.
Run by crates/loupe-cli/tests/serve.rs.
"""

import argparse
import base64
import json
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--expect", required=True)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    with open(args.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe this part."},
        ],
    }]

    r = client.chat.completions.create(model=args.model, messages=messages, max_tokens=12, temperature=0)
    got = r.choices[0].message.content
    assert got == args.expect, f"plain: {got!r} != {args.expect!r}"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, r.usage

    pieces, usage = [], None
    stream = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
    assert "".join(pieces) == args.expect, f"streamed: {''.join(pieces)!r}"
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

    schema = {
        "type": "object",
        "properties": {"verdict": {"enum": ["pass", "fail"]}},
        "required": ["verdict"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Inspect."}], max_tokens=20,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )
    v = json.loads(r.choices[0].message.content)
    assert v["verdict"] in ("pass", "fail"), v

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    except openai.NotFoundError as e:
        assert "no-such-model" in str(e), e
    else:
        raise AssertionError("an unknown model must be a 404")
    print("openai client check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

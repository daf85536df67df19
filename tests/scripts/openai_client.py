#!/usr/bin/env python3
"""Talk to stoke (or a simulated replica directly) with the official OpenAI
Python client: a chat completion, a streamed chat completion, a text
completion and the model list. Exits non-zero on any failure.

    python3 -m venv /tmp/oa && /tmp/oa/bin/pip install openai
    /tmp/oa/bin/python tests/scripts/openai_client.py http://127.0.0.1:8080/v1 llama-3.1-8b
"""
import sys

from openai import OpenAI


def main(base_url: str, model: str) -> None:
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=30)

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    print("chat:", chat.choices[0].message.content.strip(), f"({chat.usage.completion_tokens} tokens)")
    assert chat.choices[0].message.role == "assistant"

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Which pool?"}], max_tokens=4
    )
    served_by = {k: v for k, v in raw.headers.items() if k.startswith("stoke-") or k == "x-request-id"}
    print("headers:", served_by)

    pieces = []
    for event in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Stream"}], max_tokens=12, stream=True
    ):
        if event.choices and event.choices[0].delta.content:
            pieces.append(event.choices[0].delta.content)
    print(f"stream: {len(pieces)} chunks:", "".join(pieces).strip())
    assert len(pieces) == 12, pieces

    text = client.completions.create(model=model, prompt="Once", max_tokens=5)
    print("completion:", text.choices[0].text.strip())

    models = [m.id for m in client.models.list().data]
    print("models:", models)
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Read a stream that stoke holds for a waking pool with the official OpenAI
Python client: the SSE comments stoke sends while the request is held must
be ignored, and the replica's stream read as usual. Exits non-zero on any
failure. Run by tests/scale.rs (STOKE_TEST_PYTHON names the interpreter).

    python3 tests/scripts/openai_held_stream.py http://127.0.0.1:8080/v1 MODEL
"""
import sys
import time

from openai import OpenAI


def main(base_url: str, model: str) -> None:
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=30)
    started = time.monotonic()
    pieces = []
    for event in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Wake up"}],
        max_tokens=5,
        stream=True,
    ):
        for choice in event.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    took = time.monotonic() - started
    assert pieces, "no content streamed"
    print(f"streamed {len(pieces)} pieces in {took:.2f} s: {''.join(pieces)!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

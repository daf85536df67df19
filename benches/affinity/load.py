#!/usr/bin/env python3
"""Multi-turn chat load for the affinity bench: many sessions, a few shared
system prompts with Zipf popularity, each session's turns extending its
conversation. Sends streamed chats, measures time to first token, samples
the replicas' load, and reads their prefix-cache counters. Prints one JSON
object. Standard library plus httpx (httpx2 in newer openai releases, which bring it).

    load.py --target http://127.0.0.1:8080 [--target http://127.0.0.1:8081] \
            --replica http://127.0.0.1:9001 ... [--sessions 48 --turns 4 --concurrency 12]
"""
import argparse
import asyncio
import json
import random
import re
import time

try:
    import httpx
except ImportError:  # newer openai releases bring it as httpx2
    import httpx2 as httpx

WORDS = ("the edge routes every token to a warm GPU near you fast cache prefix "
         "network model replica pool wake sleep stream batch queue").split()


def text(rng, tokens):
    # About four bytes a token, as the simulated replica counts them.
    out, n = [], 0
    while n < tokens * 4:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def counters(metrics, name):
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


async def scrape(client, replicas):
    out = []
    for r in replicas:
        try:
            out.append((await client.get(r + "/metrics", timeout=2)).text)
        except httpx.HTTPError:
            out.append("")
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="append", required=True)
    ap.add_argument("--replica", action="append", required=True)
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-prompts", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--model", default="m")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sample-every", type=float, default=0.05, help="seconds between load samples")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    systems = [text(rng, args.system_tokens) for _ in range(args.system_prompts)]
    # Zipf (s = 1.2) over the system prompts: the first is hot.
    weights = [1 / (i + 1) ** 1.2 for i in range(len(systems))]
    sessions = []
    for s in range(args.sessions):
        sys_prompt = rng.choices(systems, weights)[0]
        turns = [text(rng, rng.randint(30, 150)) for _ in range(args.turns)]
        sessions.append((s, sys_prompt, turns))

    ttfts, errors, done = [], 0, 0
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        before = await scrape(client, args.replica)
        spread, steady, stop = [], [], asyncio.Event()

        async def sample():
            while not stop.is_set():
                loads = []
                for m in await scrape(client, args.replica):
                    loads.append(counters(m, "vllm:num_requests_running") + counters(m, "vllm:num_requests_waiting"))
                mean = sum(loads) / len(loads)
                if mean >= 1:
                    spread.append(max(loads) / mean)
                    # Steady: every worker still has sessions to send, so
                    # the offered load is the full concurrency (the drain
                    # at the end, with a few stragglers, is not).
                    if not queue.empty():
                        steady.append(max(loads) / mean)
                await asyncio.sleep(args.sample_every)

        queue = asyncio.Queue()
        for s in sessions:
            queue.put_nowait(s)

        async def worker():
            nonlocal errors, done
            while True:
                try:
                    sid, sys_prompt, turns = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                messages = [{"role": "system", "content": sys_prompt}]
                for t, user in enumerate(turns):
                    messages.append({"role": "user", "content": user})
                    # Turns of one session alternate between the targets
                    # (two edges of one network, for stoke).
                    target = args.target[(sid + t) % len(args.target)]
                    body = {"model": args.model, "messages": messages, "stream": True, "max_tokens": 8}
                    started = time.monotonic()
                    first, reply = None, []
                    try:
                        async with client.stream("POST", target + "/v1/chat/completions", json=body) as r:
                            if r.status_code != 200:
                                errors += 1
                                await r.aread()
                                break
                            async for line in r.aiter_lines():
                                if not line.startswith("data: ") or line == "data: [DONE]":
                                    continue
                                if first is None:
                                    first = time.monotonic() - started
                                chunk = json.loads(line[6:])
                                for c in chunk.get("choices", []):
                                    reply.append((c.get("delta") or {}).get("content") or "")
                    except httpx.HTTPError:
                        errors += 1
                        break
                    done += 1
                    if first is not None:
                        ttfts.append(first * 1000)
                    messages.append({"role": "assistant", "content": "".join(reply)})

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        took = time.monotonic() - started
        stop.set()
        await sampler
        after = await scrape(client, args.replica)

    q = sum(counters(a, "vllm:prefix_cache_queries_total") - counters(b, "vllm:prefix_cache_queries_total") for a, b in zip(after, before))
    h = sum(counters(a, "vllm:prefix_cache_hits_total") - counters(b, "vllm:prefix_cache_hits_total") for a, b in zip(after, before))
    ttfts.sort()
    spread.sort()
    steady.sort()

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None

    print(json.dumps({
        "requests": done, "errors": errors, "seconds": round(took, 2), "req_per_s": round(done / took, 2),
        "hit_rate": round(h / q, 4) if q else None,
        "ttft_ms": {"p50": pct(ttfts, 0.5), "p99": pct(ttfts, 0.99)},
        "load_max_over_mean": {"p50": pct(spread, 0.5), "p95": pct(spread, 0.95), "samples": len(spread)},
        "load_steady": {"p50": pct(steady, 0.5), "p95": pct(steady, 0.95), "samples": len(steady)},
    }))


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python3
"""Summaries for benches/e2e/run.sh.

  summarize.py RESULTDIR        markdown: per scenario, medians over rounds, paired ratios
                                (median over rounds of value / reference's value in the same
                                round; reference = haproxy, or stoke-h2 for scenario 6), the
                                same-round difference to "direct" where that is the question,
                                and the goals
  summarize.py --one FILE       one line for one run
  summarize.py --h2log LOG      percentiles of an h2load --log-file (a "log:" line)

Rounds are kept or dropped whole, per scenario, so that every target's medians, ratios and
differences come from the same rounds: a round is dropped when the run of any proxy in it had
foreign CPU (other processes on the box, see cpuacct.py) above MAX_FOREIGN % (env, default 5).
"direct" does not decide: it leaves the proxy core idle, and what others run there at a lower
priority does not slow it. If no round is left, all are kept and the scenario says so. The
"foreign %" column is the median over the rounds kept.
"""
import json, os, re, statistics, sys
from collections import defaultdict

MAX_FOREIGN = float(os.environ.get("MAX_FOREIGN", "5"))
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}
SCENARIOS = {
    # name: (title, reference target, metrics [(key, label, better)], differences to direct)
    "h1": ("1. HTTP/1.1 keep-alive, 100-byte responses, `wrk -t1 -c64`", "haproxy",
           [("rps", "req/s", "hi"), ("p50", "p50 ms", "lo"), ("p99", "p99 ms", "lo")], []),
    "h2": ("2. HTTP/2 over TLS, `h2load -t1 -c64 -m10` (percentiles from its per-request log)", "haproxy",
           [("rps", "req/s", "hi"), ("p50", "p50 ms", "lo"), ("p99", "p99 ms", "lo")], []),
    "sse": ("3. SSE token streams, 16 concurrent streams x 32 events x 5 ms (`sse_bench.py`)", "haproxy",
            [("ttfb_p50", "TTFB p50 ms", "lo"), ("ttfb_p99", "TTFB p99 ms", "lo"),
             ("delay_p50", "event delay p50 ms", "lo"), ("delay_p99", "event delay p99 ms", "lo")],
            ["ttfb_p50", "delay_p50", "delay_p99"]),
    "tls": ("4. A new TLS connection per request, `wrk -t1 -c16 -H 'Connection: close'` over https", "haproxy",
            [("rps", "req/s", "hi"), ("p50", "p50 ms", "lo"), ("p99", "p99 ms", "lo")], []),
    "low": ("5. Moderate fixed rate, HTTP/1.1, `h3load --h1 -c8 --rate R` (open loop)", "haproxy",
            [("rps", "req/s", "hi"), ("p50", "p50 ms", "lo"), ("p99", "p99 ms", "lo")], ["p50", "p99"]),
    "h3": ("6. HTTP/3 vs HTTP/2 through stoke, 4 connections x 16 streams (`h3load --h3` vs `h2load`)", "stoke-h2",
           [("rps", "req/s", "hi"), ("p50", "p50 ms", "lo"), ("p99", "p99 ms", "lo")], []),
}


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    return float(m.group(1)) * UNIT[m.group(2)] if m else None


def last_json(txt):
    for line in reversed(txt.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def cpu_fields(txt):
    """The 'cpu:' line a bench script appends after a run: its text and its
    foreign, cpu0 and cpu1 percentages."""
    r = {"cpu": "", "foreign": 0.0, "cpu0": None, "cpu1": None}
    m = re.search(r"^cpu: (.*)$", txt, re.M)
    if m:
        r["cpu"] = m.group(1).strip()
        for k in ("foreign", "cpu0", "cpu1"):
            f = re.search(rf"{k}=(\d+)%", r["cpu"])
            r[k] = float(f.group(1)) if f else None
        r["foreign"] = r["foreign"] or 0.0
    return r


def parse(path):
    txt = open(path).read()
    r = {"err": 0, **cpu_fields(txt)}
    base = os.path.basename(path)
    if re.match(r"(h1|tls)-", base):  # wrk
        m = re.search(r"Requests/sec:\s+([\d.]+)", txt)
        r["rps"] = float(m.group(1)) if m else None
        for q in ("50", "99"):
            m = re.search(rf"^\s+{q}%\s+(\S+)", txt, re.M)
            r["p" + q] = to_ms(m.group(1)) if m else None
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
        e = int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
        if m:
            e += sum(int(x) for x in m.groups())
        r["err"] = e
    elif re.match(r"(h2-|h3-r\d+-stoke-h2)", base):  # h2load
        m = re.search(r"finished in .*?, ([\d.]+) req/s", txt)
        r["rps"] = float(m.group(1)) if m else None
        m = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored", txt)
        r["err"] = int(m.group(1)) + int(m.group(2)) if m else 1
        m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", txt)
        if m:
            r["err"] += int(m.group(3)) + int(m.group(4))
        m = re.search(r"^log: n=(\d+) p50_us=(\d+) p90_us=(\d+) p99_us=(\d+)", txt, re.M)
        r["p50"], r["p99"] = (int(m.group(2)) / 1e3, int(m.group(4)) / 1e3) if m else (None, None)
    elif base.startswith("sse-"):
        j = last_json(txt) or {}
        for k in ("ttfb_p50", "ttfb_p99", "delay_p50", "delay_p99", "gap_p99"):
            r[k] = j.get(k + "_ms")
        r["err"] = j.get("errors", 1) + (0 if j.get("tokens_ok", False) else 1)
    elif re.match(r"(low-|h3-r\d+-stoke-h3)", base):  # h3load
        j = last_json(txt) or {}
        r["rps"] = j.get("rps")
        r["p50"] = j["p50_us"] / 1e3 if "p50_us" in j else None
        r["p99"] = j["p99_us"] / 1e3 if "p99_us" in j else None
        r["err"] = j.get("errors", 1)
    return r


def fmt(v, f="{:.3f}"):
    return "-" if v is None else f.format(v)


def one(path):
    r = parse(path)
    keys = [k for k in ("rps", "p50", "p99", "ttfb_p50", "ttfb_p99", "delay_p50", "delay_p99", "gap_p99") if k in r]
    parts = [f"{k}={fmt(r[k], '{:.0f}' if k == 'rps' else '{:.3f}')}" for k in keys]
    return " ".join(parts) + f" err={r['err']} {r['cpu']}"


def h2log(path):
    """h2load --log-file: start (us since epoch), status, duration (us) per request."""
    rows = []
    try:
        for line in open(path):
            f = line.split()
            if len(f) >= 3:
                rows.append((int(f[0]), int(f[1]), int(f[2])))
    except OSError:
        pass
    d = sorted(x[2] for x in rows)
    if not d:
        return "log: n=0"
    p = lambda q: d[max(1, min(len(d), -(-int(q * 1000) * len(d) // 1000))) - 1]  # noqa: E731 nearest rank
    return f"log: n={len(d)} p50_us={p(0.5)} p90_us={p(0.9)} p99_us={p(0.99)} max_us={d[-1]}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(d):
    meta = open(os.path.join(d, "meta.txt")).read() if os.path.exists(os.path.join(d, "meta.txt")) else ""
    runs = defaultdict(lambda: defaultdict(dict))  # scenario -> target -> round -> parsed
    for f in sorted(os.listdir(d)):
        m = re.match(r"(h1|h2|sse|tls|low|h3)-r(\d+)-(.+)\.txt$", f)
        if m:
            runs[m.group(1)][m.group(3)][int(m.group(2))] = parse(os.path.join(d, f))
    out = []
    m = re.search(r"^targets=(.*)$", meta, re.M)
    order = m.group(1).split(",") if m else ["direct", "nginx", "haproxy", "stoke"]
    goals = []
    for s, (title, ref, metrics, diffs) in SCENARIOS.items():
        if s not in runs:
            continue
        tg = [t for t in (["stoke-h2", "stoke-h3"] if s == "h3" else order) if t in runs[s]]
        rounds = sorted({r for t in tg for r in runs[s][t]})
        clean = [r for r in rounds
                 if all(runs[s][t][r]["foreign"] <= MAX_FOREIGN for t in tg if t != "direct" and r in runs[s][t])]
        all_kept = not clean
        keep = set(rounds if all_kept else clean)
        kept = {t: {r: v for r, v in runs[s][t].items() if r in keep} for t in tg}
        out.append(f"\n### {title}\n")
        if all_kept:
            out.append(f"Every round had a proxy run with foreign CPU above {MAX_FOREIGN:.0f}%; all are kept.\n")
        head = ["target", "n", "x"] + [lab for _, lab, _ in metrics]
        head += [f"{lab} ÷ {ref}" for _, lab, _ in metrics]
        head += [f"{k.replace('_', ' ')} − direct" for k in diffs]
        head += ["errors", "cpu1 %", "cpu0 %", "foreign %"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        res = {}
        for t in tg:
            rr = kept[t]
            row = [t, str(len(rr)), str(len(runs[s][t]) - len(rr))]
            vals = {k: med([v.get(k) for v in rr.values()]) for k, _, _ in metrics}
            row += [fmt(vals[k], "{:.0f}" if k == "rps" else "{:.3f}") for k, _, _ in metrics]
            ratios = {}
            for k, _, _ in metrics:
                xs = [v[k] / kept[ref][r][k] for r, v in rr.items()
                      if ref in kept and r in kept[ref] and v.get(k) and kept[ref][r].get(k)]
                ratios[k] = med(xs)
                row.append(fmt(ratios[k], "{:.2f}"))
            added = {}
            for k in diffs:
                xs = [v[k] - kept["direct"][r][k] for r, v in rr.items()
                      if "direct" in kept and r in kept["direct"] and v.get(k) is not None
                      and kept["direct"][r].get(k) is not None]
                added[k] = med(xs)
                row.append("-" if t == "direct" else fmt(added[k], "{:+.3f}"))
            row.append(str(sum(v["err"] for v in runs[s][t].values())))
            row.append(fmt(med([v["cpu1"] for v in rr.values()]), "{:.0f}"))
            row.append(fmt(med([v["cpu0"] for v in rr.values()]), "{:.0f}"))
            row.append(fmt(med([v["foreign"] for v in rr.values()]), "{:.0f}"))
            out.append("| " + " | ".join(row) + " |")
            res[t] = (vals, ratios, added)
        # goals
        if s == "h1" and "stoke" in res:
            _, ra, _ = res["stoke"]
            if ra.get("rps") is not None:
                goals.append(f"1. stoke req/s ≥ HAProxy: paired ratio {ra['rps']:.2f} → "
                             f"{'met' if ra['rps'] >= 1 else 'NOT met'}")
            if ra.get("p99") is not None:
                goals.append(f"1. stoke p99 ≤ HAProxy: paired ratio {ra['p99']:.2f} → "
                             f"{'met' if ra['p99'] <= 1 else 'NOT met'}")
        if s == "sse" and "stoke" in res:
            ad = res["stoke"][2].get("delay_p99")
            if ad is not None:
                goals.append(f"3. per-event delay stoke adds, p99 (stoke − direct, same round) ≤ 1 ms: "
                             f"{ad:+.3f} ms → {'met' if ad <= 1 else 'NOT met'}")
        if s == "low" and "stoke" in res:
            ad = res["stoke"][2].get("p99")
            if ad is not None:
                goals.append(f"5. p99 added over direct at a moderate rate ≤ 0.100 ms: {ad:+.3f} ms → "
                             f"{'met' if ad <= 0.1 else 'NOT met'}")
        # tracing's cost: each stoke-tRATIO against plain stoke, paired by round
        for t in tg:
            if not t.startswith("stoke-t") or "stoke" not in kept:
                continue
            for k, lab, _ in metrics:
                if k != "rps":
                    continue
                xs = [v[k] / kept["stoke"][r][k] for r, v in kept[t].items()
                      if r in kept["stoke"] and v.get(k) and kept["stoke"][r].get(k)]
                q = med(xs)
                if q is not None:
                    cost = (1 - q) * 100
                    sample = t[len("stoke-t"):]
                    target = {0.0: 1, 0.01: 3}.get(float(sample))
                    goal = ("no goal set" if target is None else
                            f"goal ≤ {target} % → {'met' if cost <= target else 'NOT met'}")
                    goals.append(f"tracing ({s}, sample {sample}): {lab} ÷ stoke without [tracing] {q:.3f} "
                                 f"(cost {cost:+.1f} %; {goal})")
        if s == "h3" and "stoke-h3" in res:
            ra = res["stoke-h3"][1]
            if ra.get("rps") is not None:
                goals.append(f"6. HTTP/3 ÷ HTTP/2 through stoke: req/s {ra['rps']:.2f}, p50 {fmt(ra.get('p50'), '{:.2f}')}, "
                             f"p99 {fmt(ra.get('p99'), '{:.2f}')} (no goal set)")
    out.append("\n### Goals\n")
    out += [f"- {g}" for g in goals]
    out.append(f"\nn = runs kept, x = runs dropped (rounds where a proxy run had foreign CPU > {MAX_FOREIGN:.0f}%, "
               "dropped for every target alike); medians over kept runs; ratios and "
               "differences are medians of same-round values; cpu1 = the proxy's core, cpu0 = load generator + "
               "upstream, foreign = CPU of the box used by other processes (busy %, medians).")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(one(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--h2log":
        print(h2log(sys.argv[2]))
    elif len(sys.argv) == 2:
        print(table(sys.argv[1]))
    else:
        print(__doc__)
        sys.exit(2)

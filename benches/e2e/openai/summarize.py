#!/usr/bin/env python3
"""Tables for benches/e2e/openai.sh.

  summarize.py RESULTDIR     markdown: per target, medians over rounds of req/s, p50, p99
                             (wrk --latency), and the paired ratios against HAProxy (in every
                             round the target's value / HAProxy's in the same round; the median
                             of those ratios), errors, CPU; then routing.md (what every target
                             answered to the routing checks) when it is there
  summarize.py --one FILE    one line for one run (r<N>-<target>.txt)

Rounds are kept or dropped whole, as in ../summarize.py: a round is dropped, for every target
alike, when a target's run in it had foreign CPU (other processes on the box, ../cpuacct.py)
above MAX_FOREIGN % (env, default 5). If no round is left, all are kept and the table says so.
"""
import os, re, sys
from collections import defaultdict

# The run.sh summarizer beside this directory: its parsing and formatting helpers.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from summarize import cpu_fields, fmt, med, to_ms  # noqa: E402

MAX_FOREIGN = float(os.environ.get("MAX_FOREIGN", "5"))
REF = "haproxy"
METRICS = [("rps", "req/s"), ("p50", "p50 ms"), ("p99", "p99 ms")]


def parse(path):
    """wrk --latency output, then the 'cpu:' line openai.sh appends."""
    txt = open(path).read()
    r = {"err": 0, **cpu_fields(txt)}
    m = re.search(r"^upstream: open=(\d+) new=(-?\d+)", txt, re.M)
    r["up_open"], r["up_new"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"Requests/sec:\s+([\d.]+)", txt)
    r["rps"] = float(m.group(1)) if m else None
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", txt, re.M)
        r["p" + q] = to_ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
    e = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    if m:
        e += sum(int(x) for x in m.groups())
    if r["rps"] is None:
        e += 1  # wrk did not finish
    r["err"] = e
    return r


def one(path):
    r = parse(path)
    return (f"rps={fmt(r['rps'], '{:.0f}')} p50={fmt(r['p50'])} p99={fmt(r['p99'])} "
            f"err={r['err']} up_open={fmt(r['up_open'], '{}')} up_new={fmt(r['up_new'], '{}')} {r['cpu']}")


def table(d):
    meta_p = os.path.join(d, "meta.txt")
    meta = open(meta_p).read() if os.path.exists(meta_p) else ""
    runs = defaultdict(dict)  # target -> round -> parsed
    for f in sorted(os.listdir(d)):
        m = re.match(r"r(\d+)-(.+)\.txt$", f)
        if m:
            runs[m.group(2)][int(m.group(1))] = parse(os.path.join(d, f))
    m = re.search(r"^targets=(.*)$", meta, re.M)
    order = [t for t in (m.group(1).split(",") if m else sorted(runs)) if t in runs]
    rounds = sorted({r for t in order for r in runs[t]})
    clean = [r for r in rounds if all(runs[t][r]["foreign"] <= MAX_FOREIGN for t in order if r in runs[t])]
    all_kept = not clean
    keep = set(rounds if all_kept else clean)
    kept = {t: {r: v for r, v in runs[t].items() if r in keep} for t in order}
    out = ["### OpenAI-shaped: POST /v1/chat/completions routed by the body's model "
           "(m1 -> replica A, m2 -> replica B, 50/50), `wrk -t1 -c64`\n"]
    if all_kept:
        out.append(f"Every round had a run with foreign CPU above {MAX_FOREIGN:.0f}%; all are kept.\n")
    head = ["target", "n", "x"] + [lab for _, lab in METRICS] + [f"{lab} ÷ {REF}" for _, lab in METRICS]
    head += ["errors", "up conns", "up new", "cpu1 %", "cpu0 %", "foreign %"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in order:
        rr = kept[t]
        row = [t, str(len(rr)), str(len(runs[t]) - len(rr))]
        row += [fmt(med([v.get(k) for v in rr.values()]), "{:.0f}" if k == "rps" else "{:.3f}")
                for k, _ in METRICS]
        for k, _ in METRICS:
            xs = [v[k] / kept[REF][r][k] for r, v in rr.items()
                  if REF in kept and r in kept[REF] and v.get(k) and kept[REF][r].get(k)]
            row.append(fmt(med(xs), "{:.2f}"))
        row.append(str(sum(v["err"] for v in runs[t].values())))
        row.append(fmt(med([v["up_open"] for v in rr.values()]), "{:.0f}"))
        row.append(fmt(med([v["up_new"] for v in rr.values()]), "{:.0f}"))
        for k in ("cpu1", "cpu0", "foreign"):
            row.append(fmt(med([v[k] for v in rr.values()]), "{:.0f}"))
        out.append("| " + " | ".join(row) + " |")
    out.append(f"\nn = runs kept, x = runs dropped (rounds where a run had foreign CPU > {MAX_FOREIGN:.0f}%, "
               "dropped for every target alike); medians over kept runs; ratios are medians of "
               "same-round ratios (above 1 is better for req/s, worse for latencies); cpu1 = the proxy's "
               "core, cpu0 = load generator + replicas, foreign = CPU of the box used by other processes; "
               "up conns = the target's connections to the replicas still open after a run (its keep-alive pool), "
               "up new = connections the replicas accepted from 1 s into a run to its end, from any process "
               "(0 when keep-alive works; while stoke runs, its health probes of the two replicas, once a second "
               "each on a new connection, add about 2 a second to every target's figure).")
    rp = os.path.join(d, "routing.md")
    if os.path.exists(rp):
        out.append("\n" + open(rp).read().rstrip())
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(one(sys.argv[2]))
    elif len(sys.argv) == 2:
        print(table(sys.argv[1]))
    else:
        print(__doc__)
        sys.exit(2)

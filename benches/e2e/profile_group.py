#!/usr/bin/env python3
"""Group a profile of the proxy by where the time goes (used by profile.sh).

  profile_group.py perf REPORT            REPORT = perf report --stdio --no-children --sort dso,symbol
  profile_group.py callgrind OUT N        OUT = a callgrind.out file (self cost per function is summed
                                          from it directly), N requests

Prints the share by group (kernel, pingora, tokio, stoke, malloc, TLS, HTTP libraries, std,
libc, other) and the top functions. Groups come from the symbol's crate (for `<A as B>::f`,
A's crate); with fat LTO much is inlined into its caller, so read groups as "code running
under this crate's functions".
"""
import re, sys
from collections import defaultdict

GROUPS = [
    ("pingora", re.compile(r"^pingora")),
    ("tokio", re.compile(r"^(tokio|mio)\b")),
    ("stoke", re.compile(r"^stoke")),
    ("malloc", re.compile(r"^(_?mi_|mimalloc|malloc|free|realloc|calloc|__libc_malloc|_int_malloc|_int_free|cfree)")),
    ("TLS/crypto", re.compile(r"^(rustls|ring|aws_lc|webpki|tokio_rustls)")),
    ("HTTP libs (http, h2, httparse, bytes, hyper)", re.compile(r"^(http|h2|httparse|bytes|hyper|httpdate|h3|quinn)\b")),
    ("metrics/tracing", re.compile(r"^(metrics|tracing|sketches|quanta)")),
    ("std/core/alloc (memcpy, fmt, hashing)", re.compile(r"^(core|alloc|std|hashbrown|memchr|__memcpy|__memmove|memcpy|memmove|memset|__memset|memcmp|__memcmp|bcmp|__memchr|strlen)")),
]


def crate_of(sym):
    s = sym.strip()
    # drop glue is the dropped type's cost; a generic `<T as Trait>` is the trait's crate
    m = re.match(r"core::ptr::drop_in_place<(.*)>$", s)
    if m:
        s = m.group(1)
    m = re.match(r"_?<[A-Z][A-Za-z0-9]* as (.*)", s)
    if m:
        s = m.group(1)
    while s.startswith("<") or s.startswith("_<") or s.startswith("&"):
        s = s.lstrip("_<&").lstrip()
        if s.startswith("mut "):
            s = s[4:]
    s = s.replace("dyn ", "")
    return re.split(r"::|<| |\(", s, maxsplit=1)[0]


def group(dso, sym):
    if "kernel" in dso or dso.startswith("[k"):
        return "kernel"
    c = crate_of(sym)
    for name, rx in GROUPS:
        if rx.match(c):
            return name
    if "libc" in dso or "ld-linux" in dso:
        return "libc (other)"
    return "other"


def show(items, total_label):
    by = defaultdict(float)
    for share, dso, sym in items:
        by[group(dso, sym)] += share
    print(f"by group ({total_label}):")
    for g, v in sorted(by.items(), key=lambda x: -x[1]):
        print(f"  {v:6.2f}%  {g}")
    print("top functions (self):")
    for share, dso, sym in sorted(items, key=lambda x: -x[0])[:40]:
        print(f"  {share:6.2f}%  [{group(dso, sym)}] {sym[:150]}")


def perf(path):
    items = []
    for line in open(path, errors="replace"):
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
        if m:
            dso = m.group(2) if m.group(3) != "k" else "[kernel]"
            items.append((float(m.group(1)), dso, m.group(4).strip()))
    show(items, "perf cpu-clock samples of the proxy process, self time")


# An allocator's entry points (mimalloc's, which Rust's `GlobalAlloc` for
# `MiMalloc` calls, and libc's): calls into them from outside the allocator
# are the allocations.
ALLOCS = re.compile(r"^(mi_(malloc|zalloc|calloc)(_aligned)?|malloc|calloc|__libc_(malloc|calloc))$")
REALLOCS = re.compile(r"^(mi_realloc(_aligned)?|realloc|__libc_realloc)$")


def callgrind(path, reqs):
    """Self cost per function from a callgrind.out file (the line after a
    `calls=` line is the inclusive cost of that call, not self cost), and
    the calls into the allocator."""
    names, objs = {}, {}
    self_cost = defaultdict(int)
    fn, ob, total, after_call = None, "", 0, False
    callee, allocs, reallocs = "", 0, 0

    def name(table, ref):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?$", ref)
        if not m:
            return ref
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), ref)

    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("fn="):
            fn = (name(objs, "(0)") if False else None, name(names, line[3:]))
            fn = (ob, fn[1])
            after_call = False
        elif line.startswith("ob="):
            ob = name(objs, line[3:])
        elif line.startswith(("cfn=", "cob=", "cfi=", "cfl=")):
            if line.startswith("cfn="):
                callee = name(names, line[4:])
            elif line.startswith("cob="):
                name(objs, line[4:])
        elif line.startswith("calls="):
            after_call = True
            if fn is not None and group("", fn[1]) != "malloc":
                n = int(line[6:].split()[0])
                if ALLOCS.match(callee):
                    allocs += n
                elif REALLOCS.match(callee):
                    reallocs += n
        elif line and (line[0].isdigit() or line[0] in "+-*") and fn is not None:
            parts = line.split()
            if len(parts) >= 2:
                if after_call:
                    after_call = False
                else:
                    c = int(parts[1])
                    self_cost[fn] += c
                    total += c
        elif line.startswith("summary:"):
            pass
    if not total:
        sys.exit("no costs found")
    print(f"instructions (user space) since the counters were reset: {total:,}; "
          f"per request: {total / reqs:,.0f} over {reqs:,} requests")
    print(f"allocations per request: {allocs / reqs:.1f} (and {reallocs / reqs:.1f} reallocations)")
    items = [(100.0 * c / total, o, f) for (o, f), c in self_cost.items()]
    show(items, "callgrind instructions, self")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "perf":
        perf(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "callgrind":
        callgrind(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)

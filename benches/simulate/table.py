"""A markdown table of `stoke simulate --json` output, one line per policy."""
import json
import sys

label = sys.argv[1]
d = json.load(sys.stdin)
by = {p["policy"]: p for p in d["policies"]}
on = by["always-on"]["gpu_seconds"]
fixed = by["fixed:5m"]
auto = by.get("auto")
print(f"\n{label}: {d['trace']['requests']} requests over {d['trace']['span_s']:.0f} s\n")
print("| policy | GPU-s | vs always-on | vs fixed:5m | scaling pools GPU-s | vs fixed:5m | vs auto | wakes | light wakes | ok % | hold p99 ms | hold max ms | TTFT p50 ms | TTFT p99 ms |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for p in d["policies"]:
    g, sg = p["gpu_seconds"], p["scaling_gpu_seconds"]
    ok = 100 * p["ok"] / max(1, p["requests"])
    row = [
        p["policy"], f"{g:.0f}", f"{g / on:.2f}", f"{g / fixed['gpu_seconds']:.2f}",
        f"{sg:.0f}", f"{sg / max(1e-9, fixed['scaling_gpu_seconds']):.2f}",
        f"{sg / max(1e-9, auto['scaling_gpu_seconds']):.2f}" if auto else "",
        str(p["wakes"]), str(p.get("light_wakes", 0)), f"{ok:.2f}",
        f"{p['hold_ms']['p99']:.0f}", f"{p['hold_ms']['max']:.0f}", f"{p['ttft_ms']['p50']:.0f}", f"{p['ttft_ms']['p99']:.0f}",
    ]
    print("| " + " | ".join(row) + " |")

#!/usr/bin/env python3
"""Turn compare.sh's JSON lines into Markdown tables: medians over rounds, ratios to nginx and direct."""
import json
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "haproxy", "baseline", "wsrouter"]


def median(values):
    return statistics.median(values) if values else float("nan")


def ratio(value, base):
    return f"{value / base:.2f}" if base else "-"


def paired(runs, base_runs, key):
    """Median over rounds of the ratio within each round: steadier than the ratio of medians
    when the machine's speed drifts between rounds."""
    base = {r.get("round", 1): r[key] for r in base_runs}
    ratios = [r[key] / base[r.get("round", 1)] for r in runs if base.get(r.get("round", 1))]
    return f"{median(ratios):.2f}" if ratios else "-"


def handshake_kind(r):
    if not r.get("tls"):
        return "plain"
    return "TLS resumed" if r.get("tls_resume") else "TLS full"


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    echo = defaultdict(list)
    shakes = defaultdict(list)
    idle = {}
    problems = []
    for r in rows:
        if r["mode"] == "echo":
            echo[(r["size"], r["connections"], r["target"])].append(r)
            if r["errors"] or r["mismatches"]:
                problems.append(f"{r['target']} size={r['size']} conns={r['connections']}: errors={r['errors']} mismatches={r['mismatches']}")
        elif r["mode"] == "handshake":
            shakes[(handshake_kind(r), r["target"])].append(r)
        elif r["mode"] == "idle":
            idle[(r.get("phase", "after_load"), r["target"])] = r
    rounds = max((r.get("round", 1) for r in rows), default=1)
    over = " over wss:// (TLS terminated by each proxy)" if any(r.get("tls") for r in rows) else ""
    print(f"Echo load{over}, median of {rounds} interleaved round(s); ratios are msgs/s against the peer.\n")
    has_base = any(t == "baseline" for _, _, t in echo)
    base_head = " vs baseline per round |" if has_base else ""
    print("| size | conns | target | msgs/s | MB/s | p50 ms | p99 ms | proxy CPU us/msg | vs nginx | vs nginx per round | vs direct |" + base_head)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_base else ""))
    for size, conns in sorted({(s, c) for s, c, _ in echo}):
        med = {}
        for t in TARGETS:
            runs = echo.get((size, conns, t), [])
            if runs:
                med[t] = {k: median([r[k] for r in runs]) for k in ("msgs_per_s", "mb_per_s", "p50_us", "p99_us")}
                cpu = [r["proxy_cpu_s"] * 1e6 / r["messages_total"] for r in runs if r.get("messages_total")]
                med[t]["cpu"] = median(cpu) if t != "direct" else None
        for t in TARGETS:
            if t not in med:
                continue
            m = med[t]
            cpu = "-" if m["cpu"] is None else f"{m['cpu']:.2f}"
            label = "64 KiB" if size == 65536 else f"{size} B"
            print(f"| {label} | {conns} | {t} | {m['msgs_per_s']:,.0f} | {m['mb_per_s']:,.1f} | {m['p50_us'] / 1000:.2f} | "
                  f"{m['p99_us'] / 1000:.2f} | {cpu} | {ratio(m['msgs_per_s'], med.get('nginx', {}).get('msgs_per_s'))} | "
                  f"{paired(echo[(size, conns, t)], echo.get((size, conns, 'nginx'), []), 'msgs_per_s')} | "
                  f"{ratio(m['msgs_per_s'], med.get('direct', {}).get('msgs_per_s'))} |"
                  + (f" {paired(echo[(size, conns, t)], echo.get((size, conns, 'baseline'), []), 'msgs_per_s')} |" if has_base else ""))
    if shakes:
        has_base = any(t == "baseline" for _, t in shakes)
        print("\n| handshake | target | handshakes/s | connect p50 ms | connect p99 ms | proxy CPU us/handshake | resumed | vs nginx | vs nginx per round | vs direct |"
              + (" vs baseline per round |" if has_base else ""))
        print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_base else ""))
        for kind in ("plain", "TLS full", "TLS resumed"):
            runs = {t: shakes[(kind, t)] for t in TARGETS if (kind, t) in shakes}
            hs = {t: median([r["handshakes_per_s"] for r in runs[t]]) for t in runs}
            for t in runs:
                p50 = median([r["p50_us"] for r in runs[t]]) / 1000
                p99 = median([r["p99_us"] for r in runs[t]]) / 1000
                cpu = [r["proxy_cpu_s"] * 1e6 / r["handshakes"] for r in runs[t] if r.get("handshakes") and "proxy_cpu_s" in r]
                cpu = f"{median(cpu):.1f}" if cpu and t != "direct" else "-"
                resumed = [r["tls_resumed"] / r["handshakes"] for r in runs[t] if r.get("handshakes") and "tls_resumed" in r]
                resumed = f"{median(resumed):.0%}" if resumed and kind != "plain" else "-"
                print(f"| {kind} | {t} | {hs[t]:,.0f} | {p50:.2f} | {p99:.2f} | {cpu} | {resumed} | {ratio(hs[t], hs.get('nginx'))} | "
                      f"{paired(runs[t], runs.get('nginx', []), 'handshakes_per_s')} | {ratio(hs[t], hs.get('direct'))} |"
                      + (f" {paired(runs[t], runs.get('baseline', []), 'handshakes_per_s')} |" if has_base else ""))
    if idle:
        print("\n| target | idle sessions held | RSS per idle session, fresh process | after the load | sessions dead after hold |")
        print("|---|---|---|---|---|")
        for t in TARGETS:
            runs = [idle[(phase, t)] for phase in ("fresh", "after_load") if (phase, t) in idle]
            if not runs:
                continue
            per = {phase: f"{idle[(phase, t)]['rss_per_session_bytes'] / 1024:.1f} KiB" if (phase, t) in idle else "-"
                   for phase in ("fresh", "after_load")}
            print(f"| {t} | {min(r['held'] for r in runs)} | {per['fresh']} | {per['after_load']} | "
                  f"{sum(r['dead_after_hold'] for r in runs)} |")
    if problems:
        print("\nErrors or mismatched echoes:\n" + "\n".join(f"- {p}" for p in problems))


if __name__ == "__main__":
    main(sys.argv[1])

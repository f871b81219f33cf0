#!/usr/bin/env python3
"""Turn compare.sh's JSON lines into Markdown tables (medians over rounds, ratios to nginx and
direct) and, with --svg FILE, a chart of the same medians (needs matplotlib)."""
import argparse
import json
import statistics
from collections import defaultdict

TARGETS = ["direct", "nginx", "haproxy", "baseline", "wsrouter", "wsrouter-uring", "wsrouter-splice"]


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


def size_label(size):
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def echo_medians(echo):
    """{(size, conns): {target: medians}} in table order; cpu is us per message (None for direct)."""
    out = {}
    for size, conns in sorted({(s, c) for s, c, _ in echo}):
        med = {}
        for t in TARGETS:
            runs = echo.get((size, conns, t), [])
            if runs:
                med[t] = {k: median([r[k] for r in runs]) for k in ("msgs_per_s", "mb_per_s", "p50_us", "p99_us")}
                cpu = [r["proxy_cpu_s"] * 1e6 / r["messages_total"] for r in runs if r.get("messages_total")]
                med[t]["cpu"] = median(cpu) if t != "direct" else None
        out[(size, conns)] = med
    return out


def handshake_cpu(runs, target):
    cpu = [r["proxy_cpu_s"] * 1e6 / r["handshakes"] for r in runs if r.get("handshakes") and "proxy_cpu_s" in r]
    return median(cpu) if cpu and target != "direct" else None


def load(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    echo = defaultdict(list)
    shakes = defaultdict(list)
    idle = {}
    syscalls = {}
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
        elif r["mode"] == "syscalls":
            syscalls[(r["connections"], r["target"])] = r
    return rows, echo, shakes, idle, syscalls, problems


def main(path):
    rows, echo, shakes, idle, syscalls, problems = load(path)
    rounds = max((r.get("round", 1) for r in rows), default=1)
    over = " over wss:// (TLS terminated by each proxy)" if any(r.get("tls") for r in rows) else ""
    print(f"Echo load{over}, median of {rounds} interleaved round(s); ratios are msgs/s against the peer.\n")
    has_base = any(t == "baseline" for _, _, t in echo)
    base_head = " vs baseline per round |" if has_base else ""
    print("| size | conns | target | msgs/s | MB/s | p50 ms | p99 ms | proxy CPU us/msg | CPU vs nginx | vs nginx | vs nginx per round | vs direct |" + base_head)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_base else ""))
    for (size, conns), med in echo_medians(echo).items():
        for t, m in med.items():
            cpu = "-" if m["cpu"] is None else f"{m['cpu']:.2f}"
            cpu_vs_nginx = "-" if m["cpu"] is None else ratio(m["cpu"], med.get("nginx", {}).get("cpu"))
            label = size_label(size)
            print(f"| {label} | {conns} | {t} | {m['msgs_per_s']:,.0f} | {m['mb_per_s']:,.1f} | {m['p50_us'] / 1000:.2f} | "
                  f"{m['p99_us'] / 1000:.2f} | {cpu} | {cpu_vs_nginx} | {ratio(m['msgs_per_s'], med.get('nginx', {}).get('msgs_per_s'))} | "
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
                cpu = handshake_cpu(runs[t], t)
                cpu = "-" if cpu is None else f"{cpu:.1f}"
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
    if syscalls:
        print("\n| conns | target | system calls per echoed 64 B message (strace -c -f) | vs nginx |")
        print("|---|---|---|---|")
        for conns in sorted({c for c, _ in syscalls}):
            per = {t: syscalls[(conns, t)]["syscalls"] / syscalls[(conns, t)]["messages_total"]
                   for t in TARGETS if (conns, t) in syscalls and syscalls[(conns, t)].get("messages_total")}
            for t, value in per.items():
                print(f"| {conns} | {t} | {value:.2f} | {ratio(value, per.get('nginx'))} |")
    if problems:
        print("\nErrors or mismatched echoes:\n" + "\n".join(f"- {p}" for p in problems))


COLOURS = {"direct": "#8c8c8c", "nginx": "#2a9d3f", "haproxy": "#1f6fb4", "baseline": "#c9a227", "wsrouter": "#d1495b", "wsrouter-uring": "#7b2d8e", "wsrouter-splice": "#e07b39"}


def bars(ax, groups, title, fmt, log=False):
    """Grouped bars: groups is [(group label, {target: value})], one colour per target."""
    targets = [t for t in TARGETS if any(t in values for _, values in groups)]
    width = 0.8 / max(len(targets), 1)
    for i, t in enumerate(targets):
        xs = [g + (i - (len(targets) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(t) for _, values in groups]
        shown = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not shown:
            continue
        drawn = ax.bar([x for x, _ in shown], [y for _, y in shown], width, label=t, color=COLOURS.get(t))
        ax.bar_label(drawn, labels=[fmt(y) for _, y in shown], fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_title(title, fontsize=9)
    if log:
        # Sizes differ by orders of magnitude; the labels carry the exact figures.
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 4)
    else:
        ax.margins(y=0.25)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def chart(path, svg):
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: a smaller file that reads in a diff
    plt.rcParams["svg.hashsalt"] = "wsrouter"  # stable ids from one run to the next
    rows, echo, shakes, idle, _, _ = load(path)
    tls = " over TLS" if any(r.get("tls") for r in rows) else ""
    medians = echo_medians(echo)
    groups = [(f"{size_label(size)} x{conns}", med) for (size, conns), med in medians.items()]
    panels = [
        ("messages/s, log scale (higher is better)", lambda m: m["msgs_per_s"], lambda v: f"{v / 1000:.1f}k"),
        ("p99 latency, ms, log scale (lower is better)", lambda m: m["p99_us"] / 1000, lambda v: f"{v:.1f}"),
        ("proxy CPU per message, us (lower is better)", lambda m: m["cpu"], lambda v: f"{v:.0f}"),
    ]
    extra = []
    if shakes:
        kinds = [k for k in ("plain", "TLS full", "TLS resumed") if any(kk == k for kk, _ in shakes)]
        hs = [(k, {t: median([r["handshakes_per_s"] for r in shakes[(k, t)]]) for t in TARGETS if (k, t) in shakes}) for k in kinds]
        cpu = [(k, {t: handshake_cpu(shakes[(k, t)], t) for t in TARGETS if (k, t) in shakes}) for k in kinds]
        extra += [(hs, "handshakes/s (higher is better)", lambda v: f"{v:,.0f}"),
                  (cpu, "proxy CPU per handshake, us (lower is better)", lambda v: f"{v:.0f}")]
    if idle:
        phases = [p for p in ("fresh", "after_load") if any(pp == p for pp, _ in idle)]
        rss = [(p.replace("_", " "), {t: idle[(p, t)]["rss_per_session_bytes"] / 1024 for t in TARGETS if (p, t) in idle}) for p in phases]
        extra.append((rss, "RSS per idle session, KiB (lower is better)", lambda v: f"{v:.1f}"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), squeeze=False)
    for i, (ax, (title, pick, fmt)) in enumerate(zip(axes[0], panels)):
        bars(ax, [(label, {t: pick(m) for t, m in med.items() if pick(m) is not None}) for label, med in groups], title, fmt, log=i < 2)
    for ax, (data, title, fmt) in zip(axes[1], extra):
        bars(ax, data, title, fmt)
    for ax in axes[1][len(extra):]:
        ax.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=len(labels), frameon=False, fontsize=9)
    rounds = max((r.get("round", 1) for r in rows), default=1)
    fig.suptitle(f"wsrouter, nginx, HAProxy{tls}: medians of {rounds} round(s), echo size x connections", y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(svg, metadata={"Date": None})
    print(f"chart: {svg}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", help="compare.sh's JSON lines")
    parser.add_argument("--svg", help="also write a chart of the medians to this SVG file")
    args = parser.parse_args()
    main(args.results)
    if args.svg:
        chart(args.results, args.svg)

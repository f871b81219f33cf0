#!/usr/bin/env bash
# Soak (not in CI): DURATION seconds (default 1800) of steady echo load plus connection churn
# through wsrouter, in CYCLE-second rounds (default 60). Each round alternates 64 B and
# 16 KiB messages on 200 connections at a fixed rate while 4 workers open and close sessions;
# after each round the router's RSS, open descriptors and session count are sampled.
# Prints a table of errors and memory over time; fails on any echo error or mismatch, or if
# RSS at the end is more than 20% above the first round after the warm-up with the same
# message size.
#
#   load-tests/soak.sh                        # 30 minutes
#   DURATION=120 CYCLE=20 load-tests/soak.sh  # a short look
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-1800}
CYCLE=${CYCLE:-60}
RATE=${RATE:-20000}
WORK=${WORK:-$ROOT/target/soak}

PROFILE=release
source load-tests/fleet.sh
fleet_build
primary_port=$(free_port)
secondary_port=$(free_port)
router_port=$(free_port)
fleet_replica "$primary_port" "$((DURATION + 300))"
fleet_replica "$secondary_port" "$((DURATION + 300))"
fleet_router "$router_port" "" $'[balance]\npolicy = "least_sessions"' "$primary_port" "$secondary_port"

url="ws://127.0.0.1:$router_port/v1/stream"
: > "$WORK/rounds.jsonl"
rounds=$(( DURATION / CYCLE ))
echo "soak.sh: $rounds rounds of $CYCLE s through wsrouter (pid $router_pid), results in $WORK"
for round in $(seq 1 "$rounds"); do
    size=$(( round % 2 ? 64 : 16384 ))
    run=$(( CYCLE - 2 ))
    "$bin/wsload" echo --url "$url" --label soak --connections 200 --size "$size" \
        --rate "$RATE" --duration "$run" --warmup 1 > "$WORK/echo.json" &
    echo_pid=$!
    "$bin/wsload" handshake --url "$url" --label churn --concurrency 4 --duration "$run" > "$WORK/churn.json"
    wait "$echo_pid"
    rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$router_pid/status")
    fds=$(ls "/proc/$router_pid/fd" | wc -l)
    python3 - "$round" "$size" "$rss_kib" "$fds" "$WORK" <<'PY' >> "$WORK/rounds.jsonl"
import json, sys
round_, size, rss, fds, work = sys.argv[1:]
echo = json.loads(open(f"{work}/echo.json").read().strip().splitlines()[-1])
churn = json.loads(open(f"{work}/churn.json").read().strip().splitlines()[-1])
print(json.dumps({"round": int(round_), "size": int(size), "msgs_per_s": echo["msgs_per_s"],
                  "p99_us": echo.get("p99_us"), "echo_errors": echo["errors"],
                  "mismatches": echo["mismatches"], "handshakes_per_s": churn["handshakes_per_s"],
                  "handshake_errors": churn["errors"], "rss_kib": int(rss), "fds": int(fds)}))
PY
    tail -1 "$WORK/rounds.jsonl"
done
python3 - "$WORK/rounds.jsonl" <<'PY'
import json, sys
rounds = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'round':>5} {'size':>6} {'msgs/s':>9} {'p99 us':>8} {'errors':>7} {'mismatch':>8} {'hs/s':>7} {'hs err':>6} {'RSS KiB':>8} {'fds':>5}")
for r in rounds:
    print(f"{r['round']:>5} {r['size']:>6} {r['msgs_per_s']:>9.0f} {r['p99_us'] or 0:>8} {r['echo_errors']:>7} "
          f"{r['mismatches']:>8} {r['handshakes_per_s']:>7.0f} {r['handshake_errors']:>6} {r['rss_kib']:>8} {r['fds']:>5}")
errors = sum(r["echo_errors"] + r["mismatches"] for r in rounds)
churn_errors = sum(r["handshake_errors"] for r in rounds)
# Memory follows the message size, so each size is compared with its own first round after
# the warm-up round.
growth = {}
for size in sorted({r["size"] for r in rounds}):
    same = [r["rss_kib"] for r in rounds if r["size"] == size and r["round"] > 1]
    if len(same) >= 2:
        growth[size] = (same[0], same[-1], same[-1] / same[0] - 1)
print(f"echo errors + mismatches: {errors}; handshake errors: {churn_errors}; "
      f"peak RSS {max(r['rss_kib'] for r in rounds)} KiB")
for size, (first, last, g) in growth.items():
    print(f"RSS at {size} B messages: {first} -> {last} KiB ({g:+.1%})")
worst = max((g for _, _, g in growth.values()), default=0.0)
sys.exit(1 if errors or churn_errors or worst > 0.20 else 0)
PY

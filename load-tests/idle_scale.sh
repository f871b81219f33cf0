#!/usr/bin/env bash
# Scale: hold SESSIONS (default 10,000) idle WebSocket sessions through wsrouter for HOLD
# seconds (default 60), then check every one still echoes; prints the router's RSS per
# session. Fails if any session could not be opened or died during the hold, or (release
# builds) if an idle session costs more than MAX_KIB_PER_SESSION (default 4.5) of RSS.
#
#   load-tests/idle_scale.sh
#   SESSIONS=2000 HOLD=5 PROFILE=debug load-tests/idle_scale.sh
#
# A proxied session costs the router two file descriptors. The script raises the open-file
# limit to the hard limit; when that cannot hold SESSIONS, it holds as many as fit and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SESSIONS=${SESSIONS:-10000}
HOLD=${HOLD:-60}
PROFILE=${PROFILE:-release}
MAX_KIB_PER_SESSION=${MAX_KIB_PER_SESSION:-4.5}
WORK=$ROOT/target/idle-scale

ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -n)
# Router: two descriptors per session plus what it keeps for itself (listeners, probes, event
# loops, stdio, splice pipes: 202 with one replica and two workers; it refuses to start with
# limits that do not fit).
fit=$(( (limit - 256) / 2 ))
if (( SESSIONS > fit )); then
    echo "idle_scale.sh: open-file limit is $limit (hard limit; raising it needs CAP_SYS_RESOURCE): holding $fit sessions instead of $SESSIONS"
    SESSIONS=$fit
else
    echo "idle_scale.sh: open-file limit $limit"
fi

source load-tests/fleet.sh
fleet_build
replica_port=$(free_port)
router_port=$(free_port)
fleet_replica "$replica_port" "$((HOLD + 600))"
fleet_router "$router_port" "max_connections = $SESSIONS"$'\n'"max_sessions = $SESSIONS" "" "$replica_port"

echo "idle_scale.sh: opening $SESSIONS sessions through wsrouter (pid $router_pid), holding them ${HOLD} s"
"$bin/wsload" idle --url "ws://127.0.0.1:$router_port/v1/stream" --label wsrouter \
    --connections "$SESSIONS" --hold "$HOLD" --pid "$router_pid" | tee "$WORK/result.json"
python3 - "$WORK/result.json" "$SESSIONS" "$PROFILE" "$MAX_KIB_PER_SESSION" <<'PY'
import json, sys
result = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
wanted = int(sys.argv[2])
profile, max_kib = sys.argv[3], float(sys.argv[4])
print(f"held {result['held']} of {wanted}, open errors {result['open_errors']}, "
      f"dead after the hold {result['dead_after_hold']}, "
      f"router RSS {result['rss_before_bytes'] >> 10} KiB -> {result['rss_during_bytes'] >> 10} KiB, "
      f"{result['rss_per_session_bytes'] / 1024:.1f} KiB per session")
ok = result["held"] == wanted and result["open_errors"] == 0 and result["dead_after_hold"] == 0
per_session_kib = result["rss_per_session_bytes"] / 1024
if profile == "release" and per_session_kib > max_kib:
    print(f"idle_scale.sh: {per_session_kib:.2f} KiB per idle session is over the budget of {max_kib} KiB")
    ok = False
sys.exit(0 if ok else 1)
PY

#!/usr/bin/env bash
# Autobahn TestSuite conformance: the fuzzing client runs every case against the echo replica
# directly, through wsrouter, and through wsrouter's TLS listener (wss://); each case's result
# through the router must equal the direct one, and no case may fail.
#
#   load-tests/autobahn.sh                 # quick set: all but 9.* (performance) and 12.*/13.* (compression)
#   CASES=compression load-tests/autobahn.sh  # 12.* and 13.* (permessage-deflate) only (slow:
#                                             # the Python testee takes about 15 minutes per agent)
#   CASES=compression-small load-tests/autobahn.sh   # the six smallest message sizes of each group
#   CASES=compression-sample load-tests/autobahn.sh  # the three (12.*) or two (13.*) smallest (CI)
#   CASES=full load-tests/autobahn.sh      # every case (about a minute more)
#
# The echo replica is wsrouter's own (no extensions), except for the compression set, whose
# replica is the suite's own testee server (`wstest -m testeeserver`), which accepts
# permessage-deflate: the router passes the negotiation and the compressed frames through.
#   PROFILE=debug load-tests/autobahn.sh   # use debug builds (what CI does; the quick set does not need speed)
#
# Needs Python 2.7 (autobahntestsuite is Python 2 only): $PYTHON2, else pyenv's 2.7, else
# python2.7 on PATH. The suite is installed once, pinned, into target/autobahn/env.
# Reports: target/autobahn/report/index.html. Bounded: the fuzzing client gets at most
# $MAX_SECONDS (default 900) and every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CASES=${CASES:-quick}
PROFILE=${PROFILE:-release}
MAX_SECONDS=${MAX_SECONDS:-900}
WORK=$ROOT/target/autobahn

python2=${PYTHON2:-}
if [[ -z $python2 ]]; then
    for candidate in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/2.7*/bin/python "$(command -v python2.7 || true)"; do
        if [[ -x $candidate ]]; then python2=$candidate; break; fi
    done
fi
if [[ -z $python2 ]]; then
    echo "autobahn.sh: Python 2.7 not found (set PYTHON2=/path/to/python2.7)" >&2
    exit 2
fi

env_dir=$WORK/env
if [[ ! -x $env_dir/bin/wstest ]]; then
    echo "autobahn.sh: installing autobahntestsuite with $python2 into $env_dir"
    rm -rf "$env_dir" "$WORK/virtualenv"
    # virtualenv goes into a private folder, not the user's site-packages.
    "$python2" -m pip install --quiet --disable-pip-version-check --target "$WORK/virtualenv" 'virtualenv<20.16'
    PYTHONPATH=$WORK/virtualenv "$python2" -m virtualenv --quiet "$env_dir"
    "$env_dir/bin/pip" install --quiet --disable-pip-version-check -r load-tests/autobahn/requirements.txt
fi

source load-tests/fleet.sh
fleet_build
replica_port=$(free_port)
router_port=$(free_port)
if [[ $CASES == compression* ]]; then
    # It answers a plain GET (the router's health probe) with a status page.
    timeout "$((MAX_SECONDS + 120))" "$env_dir/bin/wstest" -m testeeserver -w "ws://127.0.0.1:$replica_port" \
        > "$WORK/testee.log" 2>&1 &
    pids+=($!)
    python3 - "$replica_port" <<'PY'
import socket, sys, time
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("autobahn.sh: the testee server did not start")
PY
else
    fleet_replica "$replica_port" "$((MAX_SECONDS + 120))"
fi
# The suite's largest frames (9.*) are 16 MiB.
fleet_router "$router_port" 'max_frame_bytes = 67108864' "" "$replica_port"
# The same behind a TLS listener, with a certificate made for the run.
"$bin/wsload" cert --dir "$WORK/tls"
tls_port=$(free_port)
admin_port=$(free_port)
STATUS_PORT=$admin_port fleet_router "$tls_port" 'max_frame_bytes = 67108864' \
    "$(printf '[listen.tls]\ncert_file = "%s"\nkey_file = "%s"\n[admin]\nlisten = "127.0.0.1:%s"\n' \
        "$WORK/tls/cert.pem" "$WORK/tls/key.pem" "$admin_port")" "$replica_port"

case $CASES in
    quick) cases='["*"]'; exclude='["9.*", "12.*", "13.*"]' ;;
    compression) cases='["12.*", "13.*"]'; exclude='[]' ;;
    # Case ids listed one by one: the suite matches "12.*.1" as a prefix (12.1.10 too).
    compression-sample) cases=$(python3 -c 'import json; print(json.dumps(
        [f"12.{g}.{c}" for g in range(1, 6) for c in range(1, 4)]
        + [f"13.{g}.{c}" for g in range(1, 8) for c in range(1, 3)]))'); exclude='[]' ;;
    # The same with the first six message sizes of every group (up to 8 KiB messages).
    compression-small) cases=$(python3 -c 'import json; print(json.dumps(
        [f"12.{g}.{c}" for g in range(1, 6) for c in range(1, 7)]
        + [f"13.{g}.{c}" for g in range(1, 8) for c in range(1, 7)]))'); exclude='[]' ;;
    full) cases='["*"]'; exclude='[]' ;;
    *) echo "autobahn.sh: CASES must be quick, compression, compression-small, compression-sample or full" >&2; exit 2 ;;
esac
rm -rf "$WORK/report"
cat > "$WORK/fuzzingclient.json" <<JSON
{
  "outdir": "$WORK/report",
  "servers": [
    {"agent": "direct", "url": "ws://127.0.0.1:$replica_port/v1/stream"},
    {"agent": "wsrouter", "url": "ws://127.0.0.1:$router_port/v1/stream"},
    {"agent": "wsrouter-tls", "url": "wss://localhost:$tls_port/v1/stream"}
  ],
  "cases": $cases,
  "exclude-cases": $exclude,
  "exclude-agent-cases": {}
}
JSON
echo "autobahn.sh: $CASES case set, direct ws://127.0.0.1:$replica_port, wsrouter ws://127.0.0.1:$router_port and wss://localhost:$tls_port"
started=$SECONDS
(cd "$WORK" && timeout "$MAX_SECONDS" "$env_dir/bin/wstest" -m fuzzingclient -s fuzzingclient.json > "$WORK/wstest.log" 2>&1) \
    || { echo "autobahn.sh: wstest failed or timed out; see $WORK/wstest.log" >&2; tail -20 "$WORK/wstest.log" >&2; exit 1; }
echo "autobahn.sh: suite ran in $((SECONDS - started)) s"
python3 load-tests/autobahn/compare.py "$WORK/report/index.json"

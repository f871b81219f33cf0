#!/usr/bin/env bash
# Side-by-side load comparison: direct connection, nginx, HAProxy and wsrouter (on epoll, and
# as wsrouter-uring on its io_uring data plane), each in front of the same two echo replicas
# (primary + backup), interleaved round by round.
#
#   load-tests/compare.sh              # full run (about 15 minutes on 2 cores)
#   ROUNDS=1 DURATION=2 load-tests/compare.sh   # quick look
#   BASELINE=/path/to/old/wsrouter TARGETS="baseline wsrouter" load-tests/compare.sh
#                                      # this build against an earlier one, alternating
#   SYSCALLS=1 load-tests/compare.sh   # also system calls per message (strace -c -f)
#   TARGETS="direct nginx haproxy wsrouter wsrouter-splice" SIZES=1048576 CONNECTIONS="4 64" \
#     load-tests/compare.sh            # large frames, with [listen] splice = true beside
#                                      # the default copy (splice only acts from 256 KiB)
#   TLS=1 load-tests/compare.sh        # each proxy terminates TLS (wss://) with the same
#                                      # ECDSA P-256 certificate; adds full and resumed
#                                      # handshake rows (no direct or baseline rows)
#
# Everything binds 127.0.0.1, every run is bounded in time, and all processes are stopped at
# exit. The FD limit is raised as far as the hard limit allows (20000 here): peers are sized to
# 9000 connections. Prints a Markdown table; raw JSON lines and an SVG chart of the table
# (matplotlib, installed with pip into target/load-tests-venv) are kept in $OUT (default
# load-tests/results).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
SIZES=${SIZES:-"64 65536"}
CONNECTIONS=${CONNECTIONS:-"64 1000"}
IDLE_SESSIONS=${IDLE_SESSIONS:-2000}
OUT=${OUT:-load-tests/results}
BASELINE=${BASELINE:-}
TLS=${TLS:-}
if [ -n "$TLS" ]; then
  # The replicas speak plain WebSocket and the baseline build has no TLS: proxies only.
  TARGETS=${TARGETS:-"nginx haproxy wsrouter"}
else
  TARGETS=${TARGETS:-"direct nginx haproxy ${BASELINE:+baseline }wsrouter wsrouter-uring"}
fi
REPLICA_PORTS=(18001 18002)
declare -A PORT=([direct]=18001 [wsrouter]=19000 [nginx]=19001 [haproxy]=19002 [baseline]=19003 [wsrouter-uring]=19004 [wsrouter-splice]=19005)
wants() { [[ " $TARGETS " == *" $1 "* ]]; }
if wants baseline && [ ! -x "$BASELINE" ]; then echo "compare.sh: BASELINE=$BASELINE is not an executable wsrouter" >&2; exit 2; fi

# Two cores: the proxy under test gets core 0, the load generator and replicas core 1.
if [ "$(nproc)" -ge 2 ]; then PROXY_CPU="taskset -c 0"; LOAD_CPU="taskset -c 1"; else PROXY_CPU=""; LOAD_CPU=""; fi

install_peers() {
  command -v nginx >/dev/null && command -v haproxy >/dev/null && return
  echo "installing nginx and haproxy from Debian packages" >&2
  # Keep the packages' own services from starting.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

if wants nginx || wants haproxy; then install_peers; fi
cargo build --release -q -p wsrouter -p wsload
BIN=target/release
WORK=$(mktemp -d)
mkdir -p "$OUT"
RESULTS="$OUT/results-$(date +%Y%m%d-%H%M%S).jsonl"
: > "$RESULTS"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# The url a target is measured at, with the wsload options it needs.
if [ -n "$TLS" ]; then
  $BIN/wsload cert --dir "$WORK/tls"
  cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" > "$WORK/tls/haproxy.pem"
fi
url_of() {
  if [ -n "$TLS" ]; then echo "wss://localhost:${PORT[$1]}/v1/stream --ca $WORK/tls/ca.pem"
  else echo "ws://127.0.0.1:${PORT[$1]}/v1/stream"; fi
}

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

for port in "${REPLICA_PORTS[@]}"; do
  $LOAD_CPU $BIN/wsload replica --port "$port" --max-seconds 7200 2>/dev/null &
  PIDS+=($!)
done

# Every wsrouter gets the same settings; per-client limits are off because all the load
# comes from one address (an earlier build may not know those keys: they go in this one only).
# wsrouter-uring is the same build with the io_uring data plane, wsrouter-splice with splice(2)
# for large replica frames ($3: more [listen] lines).
router_config() {
  cat <<CONF
[listen]
host = "127.0.0.1"
port = $1
workers = 1
${3:-}
$([ -n "$TLS" ] && printf '[listen.tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$WORK/tls/cert.pem" "$WORK/tls/key.pem")
[limits]
max_sessions = 9000
$2
[[replicas]]
url = "http://127.0.0.1:${REPLICA_PORTS[0]}"
primary = true
[[replicas]]
url = "http://127.0.0.1:${REPLICA_PORTS[1]}"
CONF
}
# This build as target $1, with [listen] lines $2; its process id in STARTED.
STARTED=""
start_this_build() {
  router_config "${PORT[$1]}" $'max_connections = 9000\nmax_connections_per_client = 0\nmax_sessions_per_client = 0' \
    "$2" > "$WORK/$1.toml"
  RUST_LOG=wsrouter=warn $PROXY_CPU $BIN/wsrouter --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
  STARTED=$!
  PIDS+=($STARTED)
}
WSROUTER_PID="" BASELINE_PID="" URING_PID="" SPLICE_PID=""
if wants wsrouter; then start_this_build wsrouter ""; WSROUTER_PID=$STARTED; fi
if wants wsrouter-uring; then start_this_build wsrouter-uring 'io = "io_uring"'; URING_PID=$STARTED; fi
if wants wsrouter-splice; then start_this_build wsrouter-splice 'splice = true'; SPLICE_PID=$STARTED; fi
if wants baseline; then
  router_config "${PORT[baseline]}" "" > "$WORK/baseline.toml"
  RUST_LOG=wsrouter=warn $PROXY_CPU "$BASELINE" --config "$WORK/baseline.toml" 2>"$WORK/baseline.log" &
  BASELINE_PID=$!
  PIDS+=($BASELINE_PID)
fi

if wants nginx; then
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 9000; }
http {
  access_log off;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  upstream replicas {
    server 127.0.0.1:${REPLICA_PORTS[0]};
    server 127.0.0.1:${REPLICA_PORTS[1]} backup;
  }
  server {
    listen 127.0.0.1:${PORT[nginx]} backlog=4096 ${TLS:+ssl};
    $([ -n "$TLS" ] && echo "ssl_certificate $WORK/tls/cert.pem; ssl_certificate_key $WORK/tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;")
    location /v1/stream {
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
CONF
$PROXY_CPU nginx -c "$WORK/nginx.conf" -p "$WORK" -e "$WORK/nginx-error.log" &
PIDS+=($!)
fi

if wants haproxy; then

cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:${PORT[haproxy]} ${TLS:+ssl crt $WORK/tls/haproxy.pem alpn http/1.1}
  default_backend replicas
backend replicas
  server primary 127.0.0.1:${REPLICA_PORTS[0]} check inter 5s
  server backup 127.0.0.1:${REPLICA_PORTS[1]} check inter 5s backup
CONF
$PROXY_CPU haproxy -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)
fi

# Process ids whose CPU and memory are the target's own (none for a direct connection).
target_pids() {
  case "$1" in
    wsrouter) echo "$WSROUTER_PID" ;;
    wsrouter-uring) echo "$URING_PID" ;;
    wsrouter-splice) echo "$SPLICE_PID" ;;
    baseline) echo "$BASELINE_PID" ;;
    haproxy) echo "$HAPROXY_PID" ;;
    nginx) local master; master=$(cat "$WORK/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')" ;;
    direct) echo "" ;;
  esac
}

cpu_ticks() {
  local total=0
  for p in "$@"; do
    local stat; stat=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null) || continue
    total=$((total + ${stat% *} + ${stat#* }))
  done
  echo $total
}

# Wait until every target answers a WebSocket session (health checks have run).
for t in $TARGETS; do
  ok=""
  for _ in $(seq 1 100); do
    if $BIN/wsload echo --url $(url_of "$t") --connections 1 --duration 0.2 --warmup 0 2>/dev/null |
       grep -q '"errors":0,.*"mismatches":0'; then ok=1; break; fi
    sleep 0.2
  done
  [ -n "$ok" ] || { echo "$t did not come up; logs in $WORK" >&2; exit 1; }
done

# The targets in the order they run in round $1: rotated by one each round, so no target is
# always the one measured last (the machine's load drifts within a round).
round_order() {
  local targets=($TARGETS) order="" i
  for i in "${!targets[@]}"; do
    order="$order ${targets[$(( (i + $1 - 1) % ${#targets[@]} ))]}"
  done
  echo $order
}

# RSS per idle session of each proxy: on fresh processes (before any load), and again after
# the load (what a process that has carried traffic holds; allocators and pools keep some).
measure_idle() {
  for t in $TARGETS; do
    [ "$t" = direct ] && continue
    pid_args=""
    for p in $(target_pids "$t"); do pid_args="$pid_args --pid $p"; done
    line=$($LOAD_CPU $BIN/wsload idle --url $(url_of "$t") --label "$t" \
           --connections "$IDLE_SESSIONS" --hold 3 $pid_args)
    echo "${line%\}},\"phase\":\"$1\"}" >> "$RESULTS"
    echo "idle ($1): $t $(echo "$line" | grep -o '"rss_per_session_bytes":[0-9.]*')" >&2
  done
}

TICK=$(getconf CLK_TCK)
measure_idle fresh
for round in $(seq 1 "$ROUNDS"); do
  for size in $SIZES; do
    for conns in $CONNECTIONS; do
      for t in $(round_order "$round"); do
        pids=$(target_pids "$t")
        before=$(cpu_ticks $pids)
        line=$($LOAD_CPU $BIN/wsload echo --url $(url_of "$t") --label "$t" \
               --connections "$conns" --size "$size" --duration "$DURATION" --warmup "$WARMUP")
        after=$(cpu_ticks $pids)
        echo "${line%\}},\"round\":$round,\"proxy_cpu_s\":$(python3 -c "print(($after-$before)/$TICK)")}" >> "$RESULTS"
        echo "round $round: $t size=$size conns=$conns $(echo "$line" | grep -o '"msgs_per_s":[0-9.]*')" >&2
      done
    done
  done
  # Over TLS: full handshakes (no resumption), then resumed ones.
  for resume in ${TLS:+--no-resume} ""; do
    for t in $(round_order "$round"); do
      pids=$(target_pids "$t")
      before=$(cpu_ticks $pids)
      line=$($LOAD_CPU $BIN/wsload handshake --url $(url_of "$t") $resume --label "$t" --duration "$DURATION")
      after=$(cpu_ticks $pids)
      echo "${line%\}},\"round\":$round,\"proxy_cpu_s\":$(python3 -c "print(($after-$before)/$TICK)")}" >> "$RESULTS"
      echo "round $round: $t ${resume} $(echo "$line" | grep -o '"handshakes_per_s":[0-9.]*')" >&2
    done
  done
done
measure_idle after_load

# With SYSCALLS=1: system calls per echoed message of each proxy, counted by `strace -c -f`
# attached for one echo run of 64-byte messages per connection count (strace slows the proxy,
# so only the ratio means anything; io_uring's work inside io_uring_enter counts as one call).
if [ -n "${SYSCALLS:-}" ] && command -v strace >/dev/null; then
  for conns in $CONNECTIONS; do
    for t in $TARGETS; do
      [ "$t" = direct ] && continue
      strace_args=""
      for p in $(target_pids "$t"); do strace_args="$strace_args -p $p"; done
      timeout -s INT $((DURATION + WARMUP + 3)) strace -c -f $strace_args -o "$WORK/strace-$t-$conns.txt" &
      strace_pid=$!
      sleep 1
      line=$($LOAD_CPU $BIN/wsload echo --url $(url_of "$t") --label "$t" \
             --connections "$conns" --size 64 --duration "$DURATION" --warmup "$WARMUP")
      kill -INT "$strace_pid" 2>/dev/null || true
      wait "$strace_pid" 2>/dev/null || true
      calls=$(awk '$NF == "total" {print $4}' "$WORK/strace-$t-$conns.txt")
      echo "${line%\}},\"mode\":\"syscalls\",\"syscalls\":${calls:-0}}" >> "$RESULTS"
      echo "syscalls: $t conns=$conns $calls calls" >&2
    done
  done
fi

echo "raw results: $RESULTS" >&2
python3 load-tests/report.py "$RESULTS"
# The chart next to the raw results, drawn by matplotlib from a private venv (set up once).
VENV=target/load-tests-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import matplotlib" 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib >&2 ||
    { echo "compare.sh: no matplotlib (python3 -m venv and pip needed); no chart drawn" >&2; exit 0; }
fi
"$VENV/bin/python" load-tests/report.py "$RESULTS" --svg "${RESULTS%.jsonl}.svg" | grep '^chart:' >&2

# Sourced by the reliability scripts: build the binaries, start echo replicas and a router
# on free loopback ports, and stop everything on exit. Expects ROOT, WORK and PROFILE.

pids=()
fleet_cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap fleet_cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Build wsrouter and wsload in $PROFILE (release or debug); sets `bin`.
fleet_build() {
    if [[ $PROFILE == release ]]; then
        cargo build --release --quiet -p wsrouter -p wsload --bin wsrouter --bin wsload
    else
        cargo build --quiet -p wsrouter -p wsload --bin wsrouter --bin wsload
    fi
    bin=$ROOT/target/$PROFILE
    mkdir -p "$WORK"
}

# fleet_replica PORT MAX_SECONDS: an echo replica with /health that stops by itself.
fleet_replica() {
    "$bin/wsload" replica --port "$1" --max-seconds "$2" 2>> "$WORK/replicas.log" &
    pids+=($!)
}

# fleet_router PORT LIMITS EXTRA_TOML REPLICA_PORT...: start wsrouter (the first replica is
# the primary) and wait until it reports every replica healthy (on STATUS_PORT if set: the
# admin listener of a TLS router); sets `router_pid`. LIMITS are lines for [limits]; the
# per-client limits are off, as all the load comes from one address.
fleet_router() {
    local port=$1 limits=$2 extra=$3 primary=true replica
    shift 3
    {
        printf '[listen]\nhost = "127.0.0.1"\nport = %s\n\n[health_check]\ninterval_seconds = 0.5\n\n' "$port"
        printf '[limits]\nmax_connections_per_client = 0\nmax_sessions_per_client = 0\n%s\n\n%s\n' "$limits" "$extra"
        for replica in "$@"; do
            printf '\n[[replicas]]\nurl = "http://127.0.0.1:%s"\nprimary = %s\n' "$replica" "$primary"
            primary=false
        done
    } > "$WORK/router-$port.toml"
    RUST_LOG=wsrouter=warn "$bin/wsrouter" --config "$WORK/router-$port.toml" 2> "$WORK/router-$port.log" &
    router_pid=$!
    pids+=($router_pid)
    python3 "$ROOT/load-tests/wait_healthy.py" "${STATUS_PORT:-$port}" || { cat "$WORK/router-$port.log" >&2; exit 1; }
}

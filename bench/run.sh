#!/usr/bin/env bash
# Measures ratekeeper against the no-op floor on this machine (docs/performance.md).
#
# Builds in release, then, one server at a time on free loopback ports:
#   floor   `ratekeeper-load serve-noop` (a tonic server that answers OK at once)
#   memory  `ratekeeper bench/limits.yaml memory`
#   redis   `ratekeeper bench/limits.yaml redis redis://127.0.0.1:<port>` on a redis-server of
#           its own
#   disk    `ratekeeper bench/limits.yaml disk <dir>` (not in the default TARGETS: add it)
#   redis-cluster  the same on a Redis Cluster of 3 masters of its own (not in the defaults)
#   base-memory, base-redis, base-redis-cluster  the same with $BASE_BIN/ratekeeper (another
#           build, e.g. of the commit before a change: before/after in interleaved rounds)
# and drives each with `ratekeeper-load run` (one client thread) for ShouldRateLimit and the
# token pattern (CheckRateLimit then Report). With ROUNDS > 1 the three servers are measured
# in turn ROUNDS times and the table shows medians, which evens out other load on the machine.
# Then it measures memory per live counter: ratekeeper's RSS before and after COUNTERS Report
# calls for distinct users.
#
# Everything runs on 127.0.0.1, is bounded in time, and is stopped on exit.
# Settings (environment): DURATION WARMUP CONCURRENCY CONNECTIONS USERS ROUNDS COUNTERS
# TARGETS CALLS OUT SKIP_BUILD QUIET_WAIT WORKERS BASE_BIN SCRIPT_REQUESTS SERVER_ARGS CPUS
# REDIS_CPUS; see the defaults below.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DURATION=${DURATION:-10}        # seconds measured per run
WARMUP=${WARMUP:-2}             # seconds of load before measuring
CONCURRENCY=${CONCURRENCY:-64}  # operations in flight
CONNECTIONS=${CONNECTIONS:-1}   # HTTP/2 connections of the load generator
USERS=${USERS:-1000}            # distinct users (counters per limit)
ROUNDS=${ROUNDS:-1}             # times each server is measured; the table shows medians
COUNTERS=${COUNTERS:-1000000}   # live counters for the memory measurement; 0 skips it
TARGETS=${TARGETS:-floor memory redis}
CALLS=${CALLS:-should token}
OUT=${OUT:-target/bench}
SKIP_BUILD=${SKIP_BUILD:-0}
QUIET_WAIT=${QUIET_WAIT:-30}    # seconds to wait for an idle machine before each server
WORKERS=${WORKERS:-}            # ratekeeper's worker threads (TOKIO_WORKER_THREADS); empty: one per core
RK_ENV=(env)
if [ -n "$WORKERS" ]; then RK_ENV=(env "TOKIO_WORKER_THREADS=$WORKERS"); fi
SERVER_ARGS=${SERVER_ARGS:-}     # extra ratekeeper options (e.g. "--tracing-endpoint http://…")
# CPU placement (taskset lists, e.g. CPUS=0 REDIS_CPUS=1): the load generator and the server
# (floor or ratekeeper) on CPUS, every redis-server on REDIS_CPUS, as when Redis has a host of
# its own. Empty: anywhere.
CPUS=${CPUS:-}
REDIS_CPUS=${REDIS_CPUS:-}
ON_CPUS=()
if [ -n "$CPUS" ]; then ON_CPUS=(taskset -c "$CPUS"); fi
ON_REDIS_CPUS=()
if [ -n "$REDIS_CPUS" ]; then ON_REDIS_CPUS=(taskset -c "$REDIS_CPUS"); fi

if [ "$SKIP_BUILD" != 1 ]; then
    cargo build --release --bin ratekeeper --bin ratekeeper-load
fi
BIN=${BIN:-target/release}
LOAD=$BIN/ratekeeper-load
LIMITS=bench/limits.yaml

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/servers.log
: >"$RESULTS"
: >"$LOG"
WORK=$(mktemp -d)

SERVER_PID=
REDIS_PID=
CLUSTER_PIDS=
SCRAPER_PID=
cleanup() {
    for pid in $SCRAPER_PID $SERVER_PID $REDIS_PID $CLUSTER_PIDS; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    local port=$1
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "nothing listens on 127.0.0.1:$port; see $LOG" >&2
    return 1
}

# Percent of CPU time idle over one second, from /proc/stat.
idle_percent() {
    local a b
    read -r -a a < <(head -n1 /proc/stat)
    sleep 1
    read -r -a b < <(head -n1 /proc/stat)
    local total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    echo $(((b[4] - a[4] + b[5] - a[5]) * 100 / (total > 0 ? total : 1)))
}

# Waits (up to QUIET_WAIT s) until the machine is at least 90% idle, and says so if it is not.
wait_for_quiet() {
    local waited=0 idle
    while idle=$(idle_percent) && [ "$idle" -lt 90 ] && [ "$waited" -lt "$QUIET_WAIT" ]; do
        waited=$((waited + 1))
    done
    if [ "$idle" -lt 90 ]; then
        echo "  warning: the machine is busy (${idle}% idle): figures of this round are noisy" >&2
    fi
}

start_redis() {
    REDIS_PORT=$($LOAD free-port)
    "${ON_REDIS_CPUS[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" >>"$LOG" 2>&1 &
    REDIS_PID=$!
    wait_port "$REDIS_PORT"
}

# A Redis Cluster of 3 masters (no replicas); sets CLUSTER_URL.
start_cluster() {
    local ports=() port
    for i in 1 2 3; do
        port=$($LOAD free-port)
        mkdir -p "$WORK/node$i"
        "${ON_REDIS_CPUS[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --cluster-enabled yes --cluster-config-file "$WORK/node$i/nodes.conf" \
            --dir "$WORK/node$i" >>"$LOG" 2>&1 &
        CLUSTER_PIDS="$CLUSTER_PIDS $!"
        wait_port "$port"
        ports+=("$port")
    done
    redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes \
        >>"$LOG" 2>&1
    for _ in $(seq 200); do
        if redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok; then break; fi
        sleep 0.1
    done
    CLUSTER_URL="redis+cluster://$(IFS=,; echo "${ports[*]/#/127.0.0.1:}")"
}

# Starts one server; sets SERVER_PID, PORT and HTTP_PORT.
start_server() {
    local target=$1 BIN=$BIN
    PORT=$($LOAD free-port)
    HTTP_PORT=$($LOAD free-port)
    case $target in base-*)
        BIN=${BASE_BIN:?"BASE_BIN (a directory with another ratekeeper) is needed for $target"}
        target=${target#base-} ;;
    esac
    case $target in
    floor)
        "${ON_CPUS[@]}" $LOAD serve-noop --port "$PORT" >>"$LOG" 2>&1 &
        ;;
    memory)
        # shellcheck disable=SC2086 # SERVER_ARGS is a list of words
        "${ON_CPUS[@]}" "${RK_ENV[@]}" $BIN/ratekeeper -b 127.0.0.1 -p "$PORT" -B 127.0.0.1 -P "$HTTP_PORT" $SERVER_ARGS "$LIMITS" \
            memory --cache $((COUNTERS * 2 + 100000)) >>"$LOG" 2>&1 &
        ;;
    redis)
        [ -n "$REDIS_PID" ] || start_redis
        # shellcheck disable=SC2086 # SERVER_ARGS is a list of words
        "${ON_CPUS[@]}" "${RK_ENV[@]}" $BIN/ratekeeper -b 127.0.0.1 -p "$PORT" -B 127.0.0.1 -P "$HTTP_PORT" $SERVER_ARGS "$LIMITS" \
            redis "redis://127.0.0.1:$REDIS_PORT" >>"$LOG" 2>&1 &
        ;;
    disk)
        rm -rf "$OUT/disk-store"
        # shellcheck disable=SC2086
        "${ON_CPUS[@]}" "${RK_ENV[@]}" $BIN/ratekeeper -b 127.0.0.1 -p "$PORT" -B 127.0.0.1 -P "$HTTP_PORT" $SERVER_ARGS "$LIMITS" \
            disk --cache $((COUNTERS * 2 + 100000)) "$OUT/disk-store" >>"$LOG" 2>&1 &
        ;;
    redis-cluster)
        [ -n "$CLUSTER_PIDS" ] || start_cluster
        # shellcheck disable=SC2086
        "${ON_CPUS[@]}" "${RK_ENV[@]}" $BIN/ratekeeper -b 127.0.0.1 -p "$PORT" -B 127.0.0.1 -P "$HTTP_PORT" $SERVER_ARGS "$LIMITS" \
            redis "$CLUSTER_URL" >>"$LOG" 2>&1 &
        ;;
    *)
        echo "unknown target $target" >&2
        exit 2
        ;;
    esac
    SERVER_PID=$!
    wait_port "$PORT"
}

# Decisions per script call at CONCURRENCY in flight: SCRIPT_REQUESTS ShouldRateLimit calls
# (one decision each) against the script calls Redis counted meanwhile (INFO commandstats), and
# the CPU time the redis-server process(es) used for them (/proc, in clock ticks).
SCRIPT_REQUESTS=${SCRIPT_REQUESTS:-40000}
script_calls() {
    local ports pids
    if [ "${target#base-}" = redis ]; then ports=$REDIS_PORT pids=$REDIS_PID; else
        ports=$(echo "$CLUSTER_URL" | grep -o ':[0-9]*' | tr -d :) pids=$CLUSTER_PIDS; fi
    redis_ticks() {
        local sum=0 p
        for p in $pids; do
            sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
        done
        echo "$sum"
    }
    evalsha_calls() {
        local sum=0 p n
        for p in $ports; do
            n=$(redis-cli -p "$p" info commandstats | tr -d '\r' |
                sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*/\1/p')
            sum=$((sum + ${n:-0}))
        done
        echo "$sum"
    }
    local before after ticks_before ticks
    before=$(evalsha_calls)
    ticks_before=$(redis_ticks)
    "${ON_CPUS[@]}" $LOAD run --target "http://127.0.0.1:$PORT" --call should --concurrency "$CONCURRENCY" \
        --connections "$CONNECTIONS" --users "$USERS" --requests "$SCRIPT_REQUESTS" \
        --warmup 0 --duration 600 >/dev/null || true
    after=$(evalsha_calls)
    ticks=$(($(redis_ticks) - ticks_before))
    echo "$target: script calls: $((after - before)) for $SCRIPT_REQUESTS decisions at $CONCURRENCY in flight" \
        "($(awk -v d="$SCRIPT_REQUESTS" -v c="$((after - before))" 'BEGIN {printf "%.1f", d / (c > 0 ? c : 1)}') decisions per call);" \
        "Redis CPU $(awk -v d="$SCRIPT_REQUESTS" -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f us per decision, %.0f decisions/s per Redis core", t * 1e6 / hz / d, d * hz / (t > 0 ? t : 1)}')" |
        tee -a "$OUT/script-calls.txt"
}

stop_server() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

load() {
    "${ON_CPUS[@]}" $LOAD run --target "http://127.0.0.1:$PORT" --server-pid "$SERVER_PID" \
        --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" --users "$USERS" \
        --duration "$DURATION" --warmup "$WARMUP" "$@"
}

echo "== machine"
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB"
echo "$(uname -sr); $(rustc --version); $(redis-server --version | cut -d' ' -f1-3)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "$CPUS$REDIS_CPUS" ]; then
    echo "placement: load generator and server on CPUs ${CPUS:-any}, redis-server on CPUs ${REDIS_CPUS:-any}"
fi
echo "== runs: ${DURATION} s after ${WARMUP} s warm-up, ${CONCURRENCY} in flight, ${CONNECTIONS} connection(s), ${USERS} users, ${ROUNDS} round(s)"

for round in $(seq "$ROUNDS"); do
    for target in $TARGETS; do
        wait_for_quiet
        start_server "$target"
        for call in $CALLS; do
            echo "-- round $round: $target, $call"
            # (A run with failed calls still counts: the table shows its errors.)
            load --call "$call" --label "$target" --json | tee -a "$RESULTS" || true
        done
        case $target in redis* | base-redis*) script_calls ;; esac
        stop_server
    done
done

echo "== results (medians of $ROUNDS round(s); ratios to the floor of the same call)"
$LOAD table "$RESULTS" | tee "$OUT/table.txt"

if [ "$COUNTERS" -gt 0 ]; then
    echo "== memory per live counter (${COUNTERS} counters, ratekeeper in memory)"
    rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
    active() {
        curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null |
            awk '/^ratekeeper_active_counters / {print int($2)}'
    }
    wait_for_quiet
    start_server memory
    # A short warm-up on other users, so the runtime, the allocator and the connection are in
    # place before the first reading.
    $LOAD run --target "http://127.0.0.1:$PORT" --call should --concurrency "$CONCURRENCY" \
        --descriptor 'tier=free,user=warm-{user}' --duration 2 --warmup 0 >/dev/null
    sleep 2
    active >/dev/null || true
    rss_before=$(rss_kb "$SERVER_PID")
    counters_before=$(active || echo 0)
    # Scrape /metrics every second meanwhile, as Prometheus would: the exporter keeps every
    # histogram sample until a scrape drains it, which is not counter memory.
    (for _ in $(seq 600); do
        curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" >/dev/null 2>&1 || true
        sleep 1
    done) &
    SCRAPER_PID=$!
    $LOAD run --target "http://127.0.0.1:$PORT" --call report --concurrency "$CONCURRENCY" \
        --users "$COUNTERS" --requests "$COUNTERS" --order sequential --warmup 0 --duration 600 \
        --label fill | tee "$OUT/fill.txt"
    kill "$SCRAPER_PID" 2>/dev/null || true
    wait "$SCRAPER_PID" 2>/dev/null || true
    SCRAPER_PID=
    active >/dev/null || true
    sleep 2
    rss_after=$(rss_kb "$SERVER_PID")
    counters_after=$(active || echo "$((counters_before + COUNTERS))")
    stop_server
    added=$((counters_after - counters_before))
    echo "RSS before: ${rss_before} kB with ${counters_before} live counters"
    echo "RSS after:  ${rss_after} kB with ${counters_after} live counters"
    echo "bytes per live counter: $(((rss_after - rss_before) * 1024 / (added > 0 ? added : 1)))" |
        tee "$OUT/memory.txt"
fi

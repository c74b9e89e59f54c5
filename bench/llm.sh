#!/usr/bin/env bash
# Does a token budget hold while generations are in flight? (docs/budgets.md, "Budgets that hold under
# concurrency".) Starts ratekeeper on bench/llm-budget.yaml (2,000 tokens a minute per user; in
# memory, or on a redis-server of its own with STORAGE=redis), then runs `ratekeeper-load llm`
# once per pattern, each against a user of its own, and prints one JSON line per run.
#
# Settings (environment): IN_FLIGHT (64) LATENCY_MS (200) COST (100) DURATION (5) STORAGE
# (memory|redis) BIN (target/release) SKIP_BUILD. Everything runs on 127.0.0.1, is bounded in
# time, and is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IN_FLIGHT=${IN_FLIGHT:-64}
LATENCY_MS=${LATENCY_MS:-200}
COST=${COST:-100}
DURATION=${DURATION:-5}
STORAGE=${STORAGE:-memory}
BIN=${BIN:-target/release}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --bin ratekeeper --bin ratekeeper-load
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

port() { "$BIN/ratekeeper-load" free-port; }
RLS=$(port); HTTP=$(port)
storage=(memory)
if [ "$STORAGE" = redis ]; then
    REDIS=$(port)
    redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    pids+=($!)
    storage=(redis "redis://127.0.0.1:$REDIS")
fi
"$BIN/ratekeeper" -b 127.0.0.1 -p "$RLS" -B 127.0.0.1 -P "$HTTP" bench/llm-budget.yaml "${storage[@]}" \
    2>/dev/null &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$HTTP/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done

run() { # pattern user [estimate]
    "$BIN/ratekeeper-load" llm --target "http://127.0.0.1:$RLS" --pattern "$1" --user "$2" \
        --in-flight "$IN_FLIGHT" --latency-ms "$LATENCY_MS" --cost "$COST" \
        --estimate "${3:-$COST}" --budget 2000 --duration "$DURATION"
}
run check-report user1
run check-charge user2
run estimate-refund user3
run estimate-refund user4 $((COST / 2))
run reserve-commit user5
run reserve-commit user6 $((COST / 2))

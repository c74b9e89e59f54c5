#!/usr/bin/env python3
"""A tiny OpenAI-compatible upstream for trying ratekeeper behind Envoy (standard library only).

    python3 examples/mock_llm.py PORT        # PORT 0 picks a free one

Binds 127.0.0.1 and prints one line, `mock_llm listening on 127.0.0.1:<port>`, once it listens.

POST /v1/chat/completions
    Answers a chat completion whose `usage.total_tokens` is
      - the request header `x-mock-total-tokens`, if present, else
      - the request body's `max_tokens`, if present, else
      - 20.
    With `"stream": true` the answer is Server-Sent Events (`text/event-stream`): one chunk per
    word of the reply, then, when `stream_options.include_usage` is true, a final chunk with
    `"choices": []` and `usage` (as OpenAI sends it), then `data: [DONE]`.
    The header `x-mock-usage: none` leaves `usage` out (JSON and SSE alike), and
    `x-mock-delay-ms: n` answers after n milliseconds (a generation in flight; at most 10 s).
GET /stats
    {"requests": n}: how many requests the mock served, /stats itself not included. Tests use it
    to prove that rejected requests never reached the upstream.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_TOTAL_TOKENS = 20
REPLY = "Hello from the mock LLM."

_served = 0
_served_lock = threading.Lock()


def _count():
    global _served
    with _served_lock:
        _served += 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "mock_llm/1"

    def log_message(self, fmt, *args):  # one short line per request, on stderr
        sys.stderr.write("mock_llm: %s\n" % (fmt % args))

    # -- helpers -----------------------------------------------------------------------------

    def _send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # -- routes ------------------------------------------------------------------------------

    def do_GET(self):
        if self.path == "/stats":
            with _served_lock:
                served = _served
            self._send_json(200, {"requests": served})
            return
        _count()
        self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self):
        _count()
        if self.path != "/v1/chat/completions":
            self._read_body()
            self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        body = self._read_body()
        if body is None:
            self._send_json(400, {"error": {"message": "body is not a JSON object", "type": "invalid_request_error"}})
            return
        try:
            total = int(self.headers.get("x-mock-total-tokens") or body.get("max_tokens") or DEFAULT_TOTAL_TOKENS)
        except (TypeError, ValueError):
            self._send_json(400, {"error": {"message": "bad token count", "type": "invalid_request_error"}})
            return
        total = max(total, 0)
        try:
            delay_ms = min(max(int(self.headers.get("x-mock-delay-ms") or 0), 0), 10_000)
        except ValueError:
            delay_ms = 0
        time.sleep(delay_ms / 1000)
        prompt = min(total, 5)
        usage = {"prompt_tokens": prompt, "completion_tokens": total - prompt, "total_tokens": total}
        with_usage = (self.headers.get("x-mock-usage") or "").lower() != "none"
        model = body.get("model") or "mock-model"
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(model, created, usage if (with_usage and include_usage) else None)
            return
        answer = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY},
                    "finish_reason": "stop",
                }
            ],
        }
        if with_usage:
            answer["usage"] = usage
        self._send_json(200, answer)

    def _stream(self, model, created, usage):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def event(payload):
            self._chunk(b"data: " + payload + b"\n\n")

        def chunk(choices, **extra):
            return json.dumps(
                dict(
                    id="chatcmpl-mock",
                    object="chat.completion.chunk",
                    created=created,
                    model=model,
                    choices=choices,
                    **extra,
                )
            ).encode()

        words = REPLY.split(" ")
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            event(chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}]))
        event(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if usage is not None:
            event(chunk([], usage=usage))
        event(b"[DONE]")
        self._chunk(b"")  # end of the chunked body


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: mock_llm.py PORT   (0 picks a free port)")
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print("mock_llm listening on %s:%d" % (host, port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

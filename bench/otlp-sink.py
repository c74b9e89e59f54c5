#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace sink for benchmarks: answers every TraceService/Export with an
empty (OK) response and counts requests and bytes. Needs only `grpcio` (pip install grpcio).

    python3 bench/otlp-sink.py PORT
    SERVER_ARGS="--tracing-endpoint http://127.0.0.1:PORT" bench/run.sh
"""
import signal
import sys
from concurrent import futures

import grpc

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
received = {"requests": 0, "bytes": 0}


def export(request, _context):
    received["requests"] += 1
    received["bytes"] += len(request)
    return b""  # an empty ExportTraceServiceResponse


class Sink(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method == EXPORT:
            return grpc.unary_unary_rpc_method_handler(export)
        return None


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Sink(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()

    def stop(*_):
        print(f"otlp-sink: {received['requests']} exports, {received['bytes']} bytes", flush=True)
        server.stop(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait_for_termination()


if __name__ == "__main__":
    main()

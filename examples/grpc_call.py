#!/usr/bin/env python3
"""Calls ratekeeper's gRPC services from the command line, JSON in and JSON out.

Needs `pip install grpcio grpcio-reflection` and a server started with
`--grpc-reflection-service`: the message types come from the server's reflection service
(`grpc.reflection.v1alpha`), so no .proto file or code generation is needed.

    examples/grpc_call.py list
    examples/grpc_call.py envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit \
        '{"domain": "llm_tokens", "descriptors": [{"entries": [{"key": "generic_key", "value": "llm"}]}]}'
    echo '{...}' | examples/grpc_call.py kuadrant.service.ratelimit.v1.RateLimitService/Report -

Options: -a/--address HOST:PORT (default localhost:8081, or $RATEKEEPER_GRPC),
-H/--header 'key: value' (gRPC metadata, repeatable), --timeout SECONDS (default 5).
Field names in and out are the .proto names (`hits_addend`, `limit_remaining`); fields at their
default value are printed too. Exit code: 0 on an answer, 1 on a gRPC error, 2 on bad usage.
"""

import argparse
import json
import os
import sys

try:
    import grpc
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as missing:
    sys.exit(f"grpc_call.py needs grpcio and grpcio-reflection ({missing}): "
             "pip install grpcio grpcio-reflection")


def main():
    parser = argparse.ArgumentParser(
        description="Call a gRPC method of ratekeeper (through server reflection).")
    parser.add_argument("-a", "--address",
                        default=os.environ.get("RATEKEEPER_GRPC", "localhost:8081"))
    parser.add_argument("-H", "--header", action="append", default=[],
                        help="gRPC metadata as 'key: value' (repeatable)")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("method", help="SERVICE/METHOD, or `list` to list the services")
    parser.add_argument("request", nargs="?", default="{}",
                        help="the request as JSON, or - to read it from stdin (default {})")
    args = parser.parse_args()

    metadata = []
    for header in args.header:
        key, sep, value = header.partition(":")
        if not sep:
            parser.error(f"header {header!r} is not 'key: value'")
        metadata.append((key.strip().lower(), value.strip()))

    with grpc.insecure_channel(args.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"ERROR: cannot connect to {args.address} within {args.timeout:g} s",
                  file=sys.stderr)
            return 1
        database = ProtoReflectionDescriptorDatabase(channel)
        if args.method == "list":
            try:
                for name in sorted(database.get_services()):
                    print(name)
            except grpc.RpcError as error:
                return rpc_error(error, "reflection (start ratekeeper with "
                                        "--grpc-reflection-service)")
            return 0
        return call(parser, args, channel, database, metadata)


def call(parser, args, channel, database, metadata):
    service_name, sep, method_name = args.method.rpartition("/")
    if not sep or not service_name or not method_name:
        parser.error(f"{args.method!r} is not SERVICE/METHOD")
    pool = descriptor_pool.DescriptorPool(database)
    try:
        service = pool.FindServiceByName(service_name)
    except grpc.RpcError as error:
        return rpc_error(error, "reflection (start ratekeeper with --grpc-reflection-service)")
    except KeyError:
        parser.error(f"the server has no service {service_name!r} (try `list`)")
    method = service.methods_by_name.get(method_name)
    if method is None:
        names = ", ".join(sorted(service.methods_by_name))
        parser.error(f"{service_name} has no method {method_name!r} (it has {names})")
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)

    text = sys.stdin.read() if args.request == "-" else args.request
    try:
        request = json_format.Parse(text, request_type())
    except json_format.ParseError as error:
        parser.error(f"the request is not a valid {method.input_type.full_name}: {error}")

    stub = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    try:
        response = stub(request, timeout=args.timeout, metadata=metadata or None)
    except grpc.RpcError as error:
        return rpc_error(error, args.method)
    answer = json_format.MessageToDict(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    print(json.dumps(in_field_order(response.DESCRIPTOR, answer), indent=2))
    return 0


def in_field_order(descriptor, value):
    """The JSON of a message with its fields in .proto order (MessageToDict puts the fields at
    their default value last), so the same answer always prints the same."""
    if not isinstance(value, dict) or descriptor.GetOptions().map_entry:
        return value
    ordered = {}
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None:
            if isinstance(item, list):
                item = [in_field_order(field.message_type, element) for element in item]
            else:
                item = in_field_order(field.message_type, item)
        ordered[field.name] = item
    return ordered


def rpc_error(error, what):
    print(f"ERROR: {what}: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

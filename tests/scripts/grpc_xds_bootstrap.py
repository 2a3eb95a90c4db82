#!/usr/bin/env python3
"""Has gRPC's own xDS client (grpcio, the C core) read the bootstrap in GRPC_XDS_BOOTSTRAP.

gRPC parses the bootstrap only when an `xds:` target is dialed, so this dials one and makes a
call that cannot succeed offline. Its error says which step failed: "Failed to create
XdsClient: errors validating JSON: ..." when the bootstrap was refused, or the state of the
xDS channel to the bootstrap's server (with the node id it sent) when it was accepted. Prints
that error as one line: "grpc xds: <details>".
"""
import grpc

channel = grpc.insecure_channel("xds:///bootstrap-check.example:8080")
try:
    channel.unary_unary("/bootstrap.Check/Call")(b"", timeout=10)
except grpc.RpcError as error:
    print("grpc xds:", error.details(), flush=True)

"""gRPC server-streaming over the Cloud Run discovery proxy, without protobuf (raw bytes).

  grpc_stream.py serve CERT KEY   TLS server on 127.0.0.1:<free port>; prints "port N" when
                                  ready; /echo.Echo/Stream answers 3 messages "part-1..3"
                                  and records the caller's authorization in its answers.
  grpc_stream.py call TARGET      h2c client to TARGET (e.g. hello:80); prints each message.
"""
import sys
from concurrent import futures

import grpc


def serve(cert, key):
    def stream(request, context):
        meta = dict(context.invocation_metadata())
        auth = meta.get("authorization", "")
        for i in range(1, 4):
            yield f"part-{i} bearer={auth.startswith('Bearer ')}".encode()

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


def call(target):
    channel = grpc.insecure_channel(target)
    method = channel.unary_stream("/echo.Echo/Stream")
    for message in method(b"go", timeout=60):
        print(message.decode(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        call(sys.argv[2])

#!/usr/bin/env python3
"""The demo's app: a tiny HTTP server (Python standard library only).

usage: app.py NAME PORT

Answers every GET with "hello from NAME", logs one line per request with a UTC timestamp in
the format krun's logs use (so the demo can order the hops), and exits 0 on SIGTERM, as an
app that drains cleanly does.
"""

import datetime
import http.server
import signal
import sys


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {NAME}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"{now()} app {NAME}: {fmt % args} from {self.client_address[0]}", flush=True)


def main():
    global NAME
    NAME, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    print(f"{now()} app {NAME}: listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""An HBONE client written against the Python `h2` library (an implementation krun did not
write), used by krun's tests to check the wire protocol.

Modes (all print one JSON object per event on stdout):
  connect-mtls HOST PORT AUTHORITY CERT KEY CA PAYLOAD
      TLS 1.3 with a client certificate, ALPN h2, then CONNECT AUTHORITY; sends PAYLOAD,
      half-closes, prints the status and every byte that came back.
  connect-h2c HOST PORT AUTHORITY PAYLOAD
      The same over h2c (prior knowledge), as on krun's tunnel port.
  hold-mtls HOST PORT AUTHORITY CERT KEY CA PAYLOAD
      As connect-mtls, but keeps the stream open: prints the status and the echo of PAYLOAD,
      then waits for krun to end the stream and prints {"ended": true} (a policy change
      closing an open connection).
  post-tls HOST PORT PATH CERT KEY CA PAYLOAD
      h2c (prior knowledge), POST PATH as a tunnel, then TLS *inside* the stream (mesh mTLS
      through /_hbone/15003), sends PAYLOAD and prints what came back.
"""
import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def emit(**kw):
    print(json.dumps(kw), flush=True)


class Stream:
    """One tunnel stream on an h2 connection over a socket-like object."""

    def __init__(self, sock, headers):
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 << 20)
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, headers)
        self.flush()
        self.status = None
        self.data = bytearray()
        self.ended = False

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            self.ended = True
            return
        for event in self.conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                self.status = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                self.ended = True
        self.flush()

    def send(self, data, end=False):
        self.conn.send_data(self.sid, data, end_stream=end)
        self.flush()

    def wait_status(self):
        while self.status is None and not self.ended:
            self.pump()
        return self.status

    def read_all(self):
        while not self.ended:
            self.pump()


def mtls_context(cert, key, ca):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE certificates carry URI SANs, not host names
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def connect_mtls(host, port, authority, cert, key, ca, payload):
    ctx = mtls_context(cert, key, ca)
    ctx.set_alpn_protocols(["h2"])
    connect_over(lambda: ctx.wrap_socket(socket.create_connection((host, int(port)))), authority, payload)


def connect_h2c(host, port, authority, payload):
    connect_over(lambda: socket.create_connection((host, int(port))), authority, payload)


def connect_over(open_socket, authority, payload):
    try:
        sock = open_socket()
        stream = Stream(sock, [(":method", "CONNECT"), (":authority", authority)])
        status = stream.wait_status()
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return emit(error=f"{type(e).__name__}: {e}")
    if status is None:
        return emit(error="connection closed without a response")
    if status != 200:
        stream.read_all()
        return emit(status=status, body=stream.data.decode(errors="replace"))
    stream.send(payload.encode(), end=True)
    stream.read_all()
    emit(status=status, data=stream.data.decode(errors="replace"))


def hold_mtls(host, port, authority, cert, key, ca, payload):
    ctx = mtls_context(cert, key, ca)
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection((host, int(port))))
    # Only a guard against a hung test: the test waits on the lines printed.
    sock.settimeout(60)
    stream = Stream(sock, [(":method", "CONNECT"), (":authority", authority)])
    status = stream.wait_status()
    if status != 200:
        return emit(status=status)
    stream.send(payload.encode())
    while len(stream.data) < len(payload) and not stream.ended:
        stream.pump()
    emit(status=status, data=stream.data.decode(errors="replace"))
    try:
        stream.read_all()
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return emit(ended=True, error=f"{type(e).__name__}: {e}")
    emit(ended=True)


def post_tls(host, port, path, cert, key, ca, payload):
    sock = socket.create_connection((host, int(port)))
    stream = Stream(sock, [(":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"), (":path", path)])
    status = stream.wait_status()
    if status != 200:
        stream.read_all()
        return emit(status=status, body=stream.data.decode(errors="replace"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = mtls_context(cert, key, ca).wrap_bio(incoming, outgoing)

    def shuttle():
        out = outgoing.read()
        if out:
            stream.send(out)
        consumed = len(stream.data)
        if consumed:
            incoming.write(bytes(stream.data))
            stream.data.clear()
        elif not stream.ended:
            stream.pump()
            if stream.ended and not stream.data:
                incoming.write_eof()

    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                shuttle()
        tls.write(payload.encode())
        received = bytearray()
        while len(received) < len(payload):
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                if stream.ended and not stream.data:
                    break
                shuttle()
    except (ssl.SSLError, ConnectionError) as e:
        return emit(status=status, error=f"{type(e).__name__}: {e}")
    emit(status=status, data=received.decode(errors="replace"))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"connect-mtls": connect_mtls, "connect-h2c": connect_h2c, "hold-mtls": hold_mtls, "post-tls": post_tls}[mode](*args)

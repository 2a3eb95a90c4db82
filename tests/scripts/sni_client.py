"""A mesh client as a sidecar would be: mesh mTLS with an Istio SNI, to hgate.

Usage: sni_client.py HOST PORT SNI CERT KEY CA PAYLOAD
Sends PAYLOAD inside the mTLS session, reads as many bytes back, prints one JSON line."""
import json
import socket
import ssl
import sys

host, port, sni, cert, key, ca, payload = sys.argv[1:]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False  # SPIFFE certificates carry URI SANs, not host names
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(payload.encode())
            data = b""
            while len(data) < len(payload):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
            print(json.dumps({"data": data.decode(errors="replace")}))
except Exception as e:  # report, do not crash: the test asserts on the JSON
    print(json.dumps({"error": repr(e)}))

"""Captures the first bytes (the ClientHello) that real TLS clients send, for the SNI parser's
corpus. Run from this directory: python3 capture.py. Each client connects to a local listener
that records what it receives and closes."""
import socket, ssl, subprocess, threading

SNI = "outbound_.8080_._.echo.default.svc.cluster.local"

def capture(name, start_client):
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    port = srv.getsockname()[1]
    client = start_client(port)
    conn, _ = srv.accept(); conn.settimeout(5)
    data = b""
    try:
        while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
            chunk = conn.recv(65536)
            if not chunk: break
            data += chunk
    finally:
        conn.close(); srv.close()
    client()
    open(name, "wb").write(data)
    print(name, len(data))

def proc(args):
    def start(port):
        p = subprocess.Popen([a.format(port=port) for a in args], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return lambda: (p.kill(), p.wait())
    return start

def python_client(alpn):
    def start(port):
        def run():
            ctx = ssl.create_default_context()
            if alpn: ctx.set_alpn_protocols(alpn)
            try:
                with socket.create_connection(("127.0.0.1", port)) as s:
                    ctx.wrap_socket(s, server_hostname=SNI)
            except Exception:
                pass
        t = threading.Thread(target=run); t.start()
        return t.join
    return start

capture("openssl-s_client.bin", proc(["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", SNI]))
capture("openssl-s_client-tls12.bin", proc(["openssl", "s_client", "-tls1_2", "-connect", "127.0.0.1:{port}", "-servername", "echo.default.svc.cluster.local"]))
capture("curl.bin", proc(["curl", "-sk", "--resolve", "echo.default.svc.cluster.local:{port}:127.0.0.1", "https://echo.default.svc.cluster.local:{port}/"]))
capture("python-ssl.bin", python_client(None))
capture("python-ssl-alpn.bin", python_client(["h2", "istio"]))

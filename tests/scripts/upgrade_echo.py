"""Sends an HTTP/1.1 Upgrade (WebSocket) request to HOST:PORT, waits for 101, then sends a
payload through the upgraded connection and prints what comes back (the stand-in echoes)."""
import socket
import sys

host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
conn = socket.create_connection((host, port), timeout=60)
conn.sendall(
    b"GET /ws HTTP/1.1\r\nHost: " + host.encode() +
    b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
)
head = b""
while b"\r\n\r\n" not in head:
    chunk = conn.recv(4096)
    if not chunk:
        sys.exit("closed before the 101: " + head.decode(errors="replace"))
    head += chunk
status, _, rest = head.partition(b"\r\n\r\n")
print(status.split(b"\r\n")[0].decode())
conn.sendall(payload)
echoed = rest
while len(echoed) < len(payload):
    chunk = conn.recv(4096)
    if not chunk:
        break
    echoed += chunk
print("echoed " + echoed.decode(errors="replace"))

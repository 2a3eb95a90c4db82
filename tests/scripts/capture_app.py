#!/usr/bin/env python3
"""The app of the capture tests: it runs under krun inside a network namespace and makes the
connections a scenario needs, printing one line per observation for the test to wait on.

  connect DST...     non-blocking connects to every ip:port, then a blocking connect to the
                     last one; prints "connected LAST" and waits to be stopped
  dns                listens on udp 127.0.0.1:15053, sends a query to 192.0.2.53:53 and prints
                     "dns query reached 15053 from PORT" when it arrives there
  dnsloop NAME IP    a resolver chain in one namespace: an upstream server on 10.53.0.1:53
                     answering NAME with IP and a local forwarder on 127.0.0.53:53 (the
                     resolv.conf nameserver) relaying to it; resolves NAME with getaddrinfo
                     and prints "resolved NAME to IP; upstream answered N"
  echo DST MESSAGE   sends MESSAGE to DST, half-closes, prints "echoed REPLY"
  echoes LISTEN...   echo servers on every ip:port; prints "echoing" and waits to be stopped
  script FIFO        runs the steps the test writes to FIFO, one per line, until EOF:
                     "echo DST MSG" (prints "echoed REPLY" or "failed DST: ERROR"),
                     "open NAME DST" (prints "opened NAME") and "send NAME MSG" (sends MSG on
                     the held connection NAME, prints "NAME got REPLY")
  env NAME...        prints NAME=value for each variable
  forward LISTEN UP  echo server on UP; sends "ping" through LISTEN and prints "forward got ..."
  silent DST         connects to DST, sends nothing, prints "closed after N bytes" at EOF
  proxy PROXY UP     HTTP server on UP; GET http://UP/hello through PROXY (absolute URI) and a
                     CONNECT tunnel to UP; prints "proxy absolute ..." and "proxy connect ..."
"""
import os
import socket
import sys
import threading


def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def connect(targets):
    for target in targets[:-1]:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(addr(target))
        # keep the socket open so the SYN stays in flight
        connect.keep.append(s)
    s = socket.create_connection(addr(targets[-1]))
    print("connected", targets[-1], flush=True)
    s.close()
    # stay up until the test has read the counters (krun's own connections are still going)
    threading.Event().wait()


connect.keep = []


def dns():
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 15053))
    query = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(query, ("192.0.2.53", 53))
    data, peer = listener.recvfrom(512)
    assert data == query, data
    print("dns query reached 15053 from", peer[1], flush=True)


def dns_answer(query, ip):
    """A response to a one-question query: one A record for type A, else no answer."""
    question = query[12:]
    answer, count = b"", 0
    if question[-4:-2] == b"\x00\x01":
        answer, count = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(ip), 1
    header = query[:2] + b"\x81\x80\x00\x01" + count.to_bytes(2, "big") + b"\x00\x00\x00\x00"
    return header + question + answer


def udp(listen):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(listen)
    return s


def relay(server, upstream, on_query):
    while True:
        query, peer = server.recvfrom(512)
        on_query()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.sendto(query, upstream)
        reply, _ = client.recvfrom(512)
        server.sendto(reply, peer)


def dnsloop(name, ip):
    answered = [0]
    upstream = udp(("10.53.0.1", 53))

    def answer():
        while True:
            query, peer = upstream.recvfrom(512)
            answered[0] += 1
            upstream.sendto(dns_answer(query, ip), peer)

    threading.Thread(target=answer, daemon=True).start()
    forwarder = udp(("127.0.0.53", 53))
    threading.Thread(target=relay, args=(forwarder, ("10.53.0.1", 53), lambda: None), daemon=True).start()
    resolved = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    print(f"resolved {name} to {resolved}; upstream answered {answered[0]}", flush=True)


def serve(listen, handle):
    server = socket.create_server(addr(listen))

    def loop():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def echo(conn):
    while data := conn.recv(4096):
        conn.sendall(data)
    conn.close()


def http(conn):
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk:
            return
        request += chunk
    line = request.split(b"\r\n", 1)[0].decode()
    body = f"upstream saw {line}".encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    conn.close()


def script(fifo):
    held = {}
    with open(fifo) as steps:
        for line in steps:
            op, name, rest = (line.strip().split(" ", 2) + ["", ""])[:3]
            try:
                if op == "echo":
                    s = socket.create_connection(addr(name))
                    s.sendall(rest.encode())
                    s.shutdown(socket.SHUT_WR)
                    print("echoed", read_response(s), flush=True)
                elif op == "open":
                    held[name] = socket.create_connection(addr(rest))
                    print("opened", name, flush=True)
                elif op == "send":
                    held[name].sendall(rest.encode())
                    print(name, "got", held[name].recv(4096).decode(), flush=True)
            except OSError as e:
                print("failed", name + ":", e, flush=True)


def read_response(sock):
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data.decode()


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "connect":
        connect(args)
    elif command == "dns":
        dns()
    elif command == "dnsloop":
        dnsloop(*args)
    elif command == "echo":
        target, message = args
        s = socket.create_connection(addr(target))
        s.sendall(message.encode())
        s.shutdown(socket.SHUT_WR)
        print("echoed", read_response(s), flush=True)
    elif command == "echoes":
        for listen in args:
            serve(listen, echo)
        print("echoing", flush=True)
        threading.Event().wait()
    elif command == "script":
        script(args[0])
    elif command == "silent":
        s = socket.create_connection(addr(args[0]))
        print("connected", args[0], flush=True)
        print("closed after", len(read_response(s)), "bytes", flush=True)
    elif command == "env":
        for name in args:
            print(f"{name}={os.environ.get(name, '')}", flush=True)
    elif command == "forward":
        listen, upstream = args
        serve(upstream, echo)
        s = socket.create_connection(addr(listen))
        s.sendall(b"ping")
        print("forward got", s.recv(4).decode(), flush=True)
    elif command == "proxy":
        proxy, upstream = args
        serve(upstream, http)
        s = socket.create_connection(addr(proxy))
        s.sendall(f"GET http://{upstream}/hello HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n".encode())
        print("proxy absolute", read_response(s).splitlines()[-1], flush=True)
        s = socket.create_connection(addr(proxy))
        s.sendall(f"CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        s.sendall(f"GET /tunnelled HTTP/1.1\r\nHost: {upstream}\r\n\r\n".encode())
        print("proxy connect", read_response(s).splitlines()[-1], flush=True)
    else:
        sys.exit(f"unknown command {command}")


main()

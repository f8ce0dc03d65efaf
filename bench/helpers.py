#!/usr/bin/env python3
"""Loopback helpers for bench/run.sh (standard library only, traffic to 127.0.0.1 only).

  helpers.py token PORT   OAuth2 token endpoint: POST /oauth/token -> a bearer token valid a day,
                          so aleph-proxy fetches once at start-up and never during a measurement.
  helpers.py sink PORT    HTTP/1.1 upload sink: reads each request body completely (Content-Length
                          or chunked), counts it, then answers 200 with the byte count. nginx-light
                          cannot do this: `return 200` answers before the body is read.
"""
import json
import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = json.dumps(
    {"access_token": "bench-token", "expires_in": 86400, "token_type": "Bearer"}
).encode()


class Token(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(TOKEN)))
        self.end_headers()
        self.wfile.write(TOKEN)

    def log_message(self, *args):
        pass


class Sink(socketserver.BaseRequestHandler):
    """Raw socket handler: recv_into one 1 MiB buffer, so the sink is never the bottleneck."""

    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                pending += chunk
            head, pending = pending.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            if b"100-continue" in headers.get(b"expect", b"").lower():
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                total, pending = self.chunked(sock, pending)
            else:
                want = int(headers.get(b"content-length", b"0"))
                got = min(want, len(pending))
                pending = pending[got:]
                total = got
                while total < want:
                    n = sock.recv_into(view, min(len(buf), want - total))
                    if n == 0:
                        return
                    total += n
            body = json.dumps({"received": total}).encode()
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )

    @staticmethod
    def chunked(sock, pending):
        total = 0
        while True:
            while b"\r\n" not in pending:
                pending += sock.recv(65536)
            size_line, pending = pending.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(pending) < size + 2:
                more = sock.recv(1 << 20)
                if not more:
                    raise ConnectionError("eof in chunk")
                pending += more
            if size == 0:
                # Trailers are not expected; skip to the blank line.
                while not pending.startswith(b"\r\n") and b"\r\n\r\n" not in pending:
                    pending += sock.recv(65536)
                return total, pending.split(b"\r\n", 1)[1] if pending.startswith(b"\r\n") else pending.split(b"\r\n\r\n", 1)[1]
            total += size
            pending = pending[size + 2 :]


class ThreadingTCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "token":
        ThreadingHTTPServer.allow_reuse_address = True
        ThreadingHTTPServer(("127.0.0.1", port), Token).serve_forever()
    elif mode == "sink":
        ThreadingTCP(("127.0.0.1", port), Sink).serve_forever()
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

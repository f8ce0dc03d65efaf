#!/usr/bin/env python3
"""Loopback helpers for bench/run.sh (standard library only, traffic to 127.0.0.1 only).

  helpers.py token PORT   OAuth2 token endpoint: POST /oauth/token -> a bearer token valid a day,
                          so aleph-proxy fetches once at start-up and never during a measurement.
  helpers.py sink PORT    HTTP/1.1 upload sink: reads each request body completely (Content-Length
                          or chunked), counts it, then answers 200 with the byte count. nginx-light
                          cannot do this: `return 200` answers before the body is read.
  helpers.py relay PORT UPSTREAM_PORT
                          the least any user-space relay can do: TCP bytes passed on unchanged
                          with splice(2) (1 MiB pipe, one blocking thread per direction), no HTTP,
                          no headers; Reno on the client leg, as aleph-proxy's default on loopback. The transfers run it beside aleph-proxy as a reference: what
                          a third process between curl and the upstream costs on this machine.
"""
import fcntl
import json
import os
import socket
import socketserver
import sys
import threading
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


def pump(src, dst):
    """Moves bytes src -> dst through a pipe until src ends, then half-closes dst."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ, as aleph-proxy does
    except OSError:
        pass
    try:
        while True:
            n = os.splice(src.fileno(), w, 1 << 20, flags=os.SPLICE_F_MOVE)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Relay(socketserver.BaseRequestHandler):
    upstream_port = 0

    def handle(self):
        # As aleph-proxy's default (tcp.client_congestion_control = "auto") does on loopback:
        # Reno on the leg to the client, so the reference gets the same unpaced client leg.
        try:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
        except (OSError, AttributeError):
            pass
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        t = threading.Thread(target=pump, args=(self.request, up), daemon=True)
        t.start()
        pump(up, self.request)
        t.join()
        up.close()


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
    elif mode == "relay":
        if not hasattr(os, "splice"):
            sys.exit("relay needs os.splice (Linux, Python 3.10+)")
        Relay.upstream_port = int(sys.argv[3])
        ThreadingTCP(("127.0.0.1", port), Relay).serve_forever()
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A counting HTTP proxy in front of Azurite or moto, for bench/online.sh.

    objproxy.py LISTEN_PORT UPSTREAM_PORT

Forwards every request to 127.0.0.1:UPSTREAM_PORT unchanged (headers included, so
signatures still match) and counts requests by method and body bytes each way, so
holdfast and rclone are measured by the same meter. GET /__stats answers the counts as
JSON; POST /__reset zeroes them. Stdlib only; loopback only.
"""
import http.client
import http.server
import json
import sys
import threading

LOCK = threading.Lock()
STATS = {}


def reset():
    with LOCK:
        STATS.clear()
        STATS.update({"requests": 0, "bytes_up": 0, "bytes_down": 0, "by_method": {}})


def count(method, up, down):
    with LOCK:
        STATS["requests"] += 1
        STATS["bytes_up"] += up
        STATS["bytes_down"] += down
        STATS["by_method"][method] = STATS["by_method"].get(method, 0) + 1


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = 0

    def log_message(self, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer lines up to the blank one.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def forward(self):
        if self.path == "/__stats":
            with LOCK:
                data = json.dumps(STATS).encode()
            return self.reply(200, data)
        if self.path == "/__reset":
            reset()
            return self.reply(200, b"{}")
        data = self.body()
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=120)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() in ("transfer-encoding", "content-length", "connection"):
                continue
            conn.putheader(k, v)
        if data or self.command in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data if data else None)
        resp = conn.getresponse()
        head = self.command == "HEAD"
        payload = b"" if head else resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in ("transfer-encoding", "connection", "keep-alive"):
                continue
            if lk == "content-length" and not head:
                continue
            self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        conn.close()
        count(self.command, len(data), len(payload))

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward


def main():
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    Handler.upstream = upstream
    reset()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", listen), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A small real HTTP server for saga's tests, the demo and the benchmarks.

Every request is appended to --log as one JSON line (time, path, status,
headers, body, and the client's port, which tells the connection) before it
is answered. With --idle-timeout S, a kept-alive connection idle for S seconds
is closed by the server. The path chooses the behaviour:

  /ok...                 200
  /status/NNN            answer NNN
  /flaky/N...            500 for the first N requests of each Idempotency-Key, then 200
  /retry-after/S...      429 with "Retry-After: S" for the first request of a key, then 200
  /hang                  never answer (until the client gives up)
  /reset                 close the connection without answering (RST)
  /apply-then-drop...    record the request, then drop the connection unanswered,
                         the first time per key; 200 after that
  /hang-then-ok/N...     never answer the first N requests of each key, then 200
  /echo...               200 with the request body under "request"
anything else            404

Answers are JSON: {"status": NNN, "key": <Idempotency-Key>}, plus "request"
for /echo and /hang-then-ok.

The port is written to --port-file once the server listens.
"""
import argparse
import json
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
seen = {}
log_file = None


def record(handler, status, body):
    entry = {
        "time": time.time(),
        "path": handler.path,
        "status": status,
        "headers": {k: v for k, v in handler.headers.items()},
        "body": body.decode("utf-8", "replace"),
        "client_port": handler.client_address[1],
    }
    with lock:
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()


def count(path, key):
    with lock:
        n = seen.get((path, key), 0)
        seen[(path, key)] = n + 1
        return n


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def drop(self, reset):
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        key = self.headers.get("Idempotency-Key")
        parts = self.path.strip("/").split("/")
        kind = parts[0]
        status = 404
        extra = {}
        answer = {}
        if kind == "ok":
            status = 200
        elif kind == "status" and len(parts) > 1:
            status = int(parts[1])
        elif kind == "flaky" and len(parts) > 1:
            status = 500 if count(self.path, key) < int(parts[1]) else 200
        elif kind == "retry-after" and len(parts) > 1:
            if count(self.path, key) == 0:
                status = 429
                extra["Retry-After"] = parts[1]
            else:
                status = 200
        elif kind == "echo":
            status = 200
            answer["request"] = json.loads(body or b"null")
        elif kind == "hang-then-ok" and len(parts) > 1:
            if count(self.path, key) < int(parts[1]):
                record(self, 0, body)
                time.sleep(3600)
                return
            status = 200
            answer["request"] = json.loads(body or b"null")
        elif kind == "hang":
            record(self, 0, body)
            time.sleep(3600)
            return
        elif kind == "reset":
            record(self, 0, body)
            self.drop(reset=True)
            return
        elif kind == "apply-then-drop":
            if count(self.path, key) == 0:
                record(self, 0, body)
                self.drop(reset=True)
                return
            status = 200
        record(self, status, body)
        answer.update({"status": status, "key": key})
        self.answer(status, json.dumps(answer).encode(), extra)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


def main():
    global log_file
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--log", required=True)
    ap.add_argument("--idle-timeout", type=float)
    args = ap.parse_args()
    if args.idle_timeout:
        Handler.timeout = args.idle_timeout
    log_file = open(args.log, "a")
    server = Server(("127.0.0.1", args.port), Handler)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        import os
        os.rename(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

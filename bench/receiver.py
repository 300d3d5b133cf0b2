#!/usr/bin/env python3
"""HTTP receiver for the latency benchmark.

Single-threaded (selectors), keep-alive, answers every POST with 200. For each
request it notes time.monotonic() when the request's first bytes are read,
and the "n" field of its JSON body. On SIGTERM it writes {"n": time, ...} as
JSON to --out and exits. time.monotonic() is CLOCK_MONOTONIC, the clock the
publisher uses too (same machine).

    receiver.py --port-file FILE --out FILE
"""
import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class Client:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.started = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    arrivals = {}
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(args.port_file + ".tmp", args.port_file)

    while not stop:
        for key, _ in sel.select(timeout=0.2):
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, Client(conn))
                continue
            c = key.data
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                sel.unregister(c.sock)
                c.sock.close()
                continue
            if not c.buf:
                c.started = now
            c.buf += data
            while True:
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                length = 0
                for line in bytes(c.buf[:end]).split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if len(c.buf) < end + 4 + length:
                    break
                body = bytes(c.buf[end + 4:end + 4 + length])
                del c.buf[:end + 4 + length]
                try:
                    arrivals[json.loads(body)["n"]] = c.started
                except (ValueError, KeyError, TypeError):
                    pass
                c.sock.sendall(RESPONSE)
                c.started = now if c.buf else None

    with open(args.out, "w") as f:
        json.dump(arrivals, f)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The demo's LISTEN client: a psql session that runs LISTEN and prints every
notification it receives.

psql prints pending notifications after each command it runs, so the client
sends LISTEN once and then an empty query every 100 ms. Each notification is
printed as one line, `<unix time> <channel> <payload>`, to stdout.

    listen.py CHANNEL psql-argument...
"""
import re
import signal
import subprocess
import sys
import threading
import time

NOTE = re.compile(r'^Asynchronous notification "(.*?)" with payload "(.*)" '
                  r'received from server process with PID \d+\.$')


def main():
    channel, psql_args = sys.argv[1], sys.argv[2:]
    psql = subprocess.Popen(["psql", "-X", "-q", "-A", "-t", *psql_args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)

    def stop(*_):
        psql.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def tick():
        try:
            psql.stdin.write('LISTEN "%s";\n' % channel.replace('"', '""'))
            while True:
                psql.stdin.write("SELECT WHERE false;\n")
                psql.stdin.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ValueError):
            pass

    threading.Thread(target=tick, daemon=True).start()
    for line in psql.stdout:
        m = NOTE.match(line.rstrip("\n"))
        if m:
            print("%.6f %s %s" % (time.time(), m.group(1), m.group(2)), flush=True)
    return psql.wait()


if __name__ == "__main__":
    sys.exit(main())

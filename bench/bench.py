#!/usr/bin/env python3
"""saga benchmarks: each figure is a ratio against a baseline measured in the
same run, on throwaway clusters (fsync on, saga preloaded) started here.

Run through bench/run, which installs the dependencies, builds and installs
the extension and calls this as the unprivileged user. See bench/README.md.
"""
import argparse
import getpass
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgconn import Conn, PgError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["publish", "notify", "http", "latency", "growth", "sagas", "start", "saga_latency",
              "remote", "remote_latency"]

SIZES = {
    "full": dict(publish_seconds=8, publish_rounds=5, notify_messages=100000, notify_rounds=2,
                 http_messages=20000, http_rounds=2, http_concurrency=64, wrk_seconds=10,
                 latency_seconds=20, latency_rate=100, growth_messages=1000000, growth_batch=10000,
                 saga_count=20000, saga_seconds=10, start_seconds=8, start_rounds=3,
                 saga_latency_count=500, saga_latency_rate=50, dbos_workflows=3000,
                 dbos_concurrency=16, dbos_rounds=2, remote_messages=50000, remote_sagas=300),
    "quick": dict(publish_seconds=5, publish_rounds=2, notify_messages=20000, notify_rounds=1,
                  http_messages=5000, http_rounds=1, http_concurrency=64, wrk_seconds=5,
                  latency_seconds=5, latency_rate=100, growth_messages=200000, growth_batch=10000,
                  saga_count=3000, saga_seconds=5, start_seconds=5, start_rounds=1,
                  saga_latency_count=100, saga_latency_rate=50, dbos_workflows=500,
                  dbos_concurrency=16, dbos_rounds=1, remote_messages=10000, remote_sagas=100),
}

# a 200-byte business value and a 200-byte JSON payload
NOTE = ("order 4711 for customer 0042: 3 items, paid by card, ship to the depot "
        * 4)[:200]


def payload(n=None, size=200):
    head = '{"order_id":4711,"customer":"c-0042","items":[{"sku":"A-100","qty":3}],'
    if n is not None:
        head += '"n":%d,' % n
    fill = size - len(head) - len('"note":""}')
    return head + '"note":"' + "x" * max(fill, 0) + '"}'


PAYLOAD = payload()
assert len(PAYLOAD) == 200 and len(NOTE) == 200


def abbreviate(sql):
    return sql.replace(NOTE, "<200-byte note>").replace(PAYLOAD, "<200-byte JSON>")


def say(msg=""):
    print(msg, flush=True)


def fmt_int(x):
    return "{:,.0f}".format(x)


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (None if unreadable)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def sum_cpu(pids):
    total = 0.0
    for pid in pids:
        v = cpu_seconds(pid)
        if v is None:
            return None
        total += v
    return total


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class BenchError(Exception):
    pass


def wait_until(what, check, timeout, interval=0.005):
    """Poll check() until it returns a true value; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise BenchError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


# ---------------------------------------------------------------- clusters

CONF = [
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
    ("shared_buffers", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    ("max_connections", "50"),
    ("autovacuum", "on"),
    ("log_autovacuum_min_duration", "0"),
    ("log_checkpoints", "on"),
    ("shared_preload_libraries", "'saga'"),
    ("saga.poll_interval", "1s"),
]


class Cluster:
    port = 5432

    def __init__(self, base, name, extra_conf=()):
        self.name = name
        self.dir = os.path.join(base, name)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgresql.log")
        self.user = getpass.getuser()
        self.running = False
        os.makedirs(self.dir)
        subprocess.run(["initdb", "-D", self.data, "-A", "trust", "-U", self.user,
                        "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# saga benchmarks\nlisten_addresses = ''\nport = %d\n"
                    "unix_socket_directories = '%s'\n" % (self.port, self.dir))
            for k, v in list(CONF) + list(extra_conf):
                f.write("%s = %s\n" % (k, v))
        subprocess.run(["pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "120", "start"],
                       check=True, stdout=subprocess.DEVNULL)
        self.running = True
        c = self.connect("postgres")
        c.query("CREATE DATABASE bench")
        c.close()

    def connect(self, db="bench"):
        return Conn(self.dir, self.port, db, self.user)

    def conninfo_args(self, db="bench"):
        return ["-h", self.dir, "-p", str(self.port), "-U", self.user, db]

    def stop(self):
        if self.running:
            subprocess.run(["pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running = False

    def setup_saga(self, conn):
        conn.query("CREATE EXTENSION saga")
        wait_until("the saga worker to start", lambda: conn.value(
            "SELECT count(*) FROM saga.worker_status() WHERE kind = 'worker'"
            " AND database = current_database() AND state IN ('idle', 'dispatching')") == "1", 60, 0.1)

    @staticmethod
    def worker_pid(conn):
        return int(conn.value("SELECT pid FROM saga.worker_status() WHERE kind = 'worker'"
                              " AND database = current_database()"))


# "is anything pending?": stops at the first pending row (a partial index on
# status = 'pending' serves it); no ORDER BY, which could force a sort of
# every pending row
PENDING_PROBE = "SELECT 1 FROM saga.queue WHERE status = 'pending' LIMIT 1"


def wait_drained(conn, timeout):
    wait_until("saga.outbox to be empty", lambda: conn.value(PENDING_PROBE) is None, timeout)
    return time.monotonic()


def check_outbox_empty(conn):
    pending, dead = conn.query("SELECT (SELECT count(*) FROM saga.outbox),"
                               " (SELECT count(*) FROM saga.dead_letters)")[0]
    if pending != "0" or dead != "0":
        raise BenchError("outbox not clean: %s pending, %s dead letters" % (pending, dead))


# ---------------------------------------------------------------- results

class Row:
    def __init__(self, name, figure, baseline, ratio, target, ok, skipped=False):
        self.name, self.figure, self.baseline = name, figure, baseline
        self.ratio, self.target, self.ok = ratio, target, ok
        self.skipped = skipped


def print_table(rows):
    head = ("benchmark", "figure", "baseline", "ratio", "target", "result")
    cells = [head] + [(r.name, r.figure, r.baseline,
                       "-" if r.ratio is None else "%.2f" % r.ratio, r.target,
                       "skip" if r.skipped else "pass" if r.ok else "FAIL") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(c[j].ljust(widths[j]) for j in range(len(head))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- 1. publish

class Decoder:
    """pg_recvlogical streaming a new logical slot (pgoutput, messages only)
    to /dev/null until stop(): a walsender decodes the run's WAL as it is
    written, each record once."""

    def __init__(self, cl, c):
        self.c = c
        c.query("SELECT pg_create_logical_replication_slot('bench_outbox', 'pgoutput')")
        self.proc = subprocess.Popen(
            ["pg_recvlogical", "--start", "-S", "bench_outbox", "-f", "/dev/null", "-F", "1", "-s", "1",
             "-o", "proto_version=1", "-o", "publication_names=bench_no_tables", "-o", "messages=true",
             "-h", cl.dir, "-p", str(cl.port), "-U", cl.user, "-d", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pid = int(wait_until("pg_recvlogical to stream", lambda: c.value(
            "SELECT pid FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'"), 30, 0.05))

    def stop(self):
        """Wait until the slot has read all WAL written so far, then drop it."""
        end = self.c.value("SELECT pg_current_wal_lsn()")
        wait_until("the decoder to read the run's WAL", lambda: self.c.value(
            "SELECT confirmed_flush_lsn >= '%s' FROM pg_replication_slots"
            " WHERE slot_name = 'bench_outbox'" % end) == "t", 60, 0.1)
        self.proc.terminate()
        self.proc.communicate(timeout=30)
        wait_until("the walsender to exit", lambda: self.c.value(
            "SELECT count(*) FROM pg_stat_replication") == "0", 30, 0.05)
        self.c.query("SELECT pg_drop_replication_slot('bench_outbox')")


def bench_publish(ctx):
    o = ctx.opts
    say("== publish overhead: pgbench, 8 clients, %d s per run, %d rounds (variants alternate;"
        " the ratio is the median of the per-round ratios)"
        % (o.publish_seconds, o.publish_rounds))
    # wal_level = logical only for the decoded WAL record reference below
    cl = ctx.cluster("publish", [("wal_level", "logical")])
    c = cl.connect()
    cl.setup_saga(c)
    c.query("CREATE TABLE bench_orders (id bigserial PRIMARY KEY, note text NOT NULL)")

    # A destination that never completes a delivery and never competes for
    # CPU: a listener that accepts TCP connections (kernel backlog) but never
    # answers. With concurrency 1 and a one-day time-out, the first message
    # stays in flight and the worker claims nothing more.
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(16)
    ctx.keep(stall)
    url = "http://127.0.0.1:%d/stalled" % stall.getsockname()[1]
    opts = '{"concurrency": 1, "timeout": "1 day", "max_attempts": 1000}'
    c.query("SELECT saga.create_destination('stalled', '%s', '%s')" % (url, opts))
    c.query("SELECT saga.subscribe('bench.t', 'stalled')")
    c.query("SELECT saga.publish('bench.t', '%s')" % PAYLOAD)
    wait_until("the first message to be in flight", lambda: c.value(
        "SELECT in_flight FROM saga.worker_status() WHERE kind = 'worker'"
        " AND database = current_database()") == "1", 30, 0.05)
    worker = cl.worker_pid(c)

    # reference only: what a hand-rolled outbox row (saga.queue's shape and
    # indexes, in a plain table) adds to the same transaction
    c.query("CREATE TABLE plain_outbox (LIKE saga.queue INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
            " INCLUDING INDEXES) WITH (fillfactor = 90)")
    # the floor of any outbox that writes a row in the user's transaction:
    # the same row in a table with no index and no constraint
    c.query("CREATE TABLE bare_outbox (LIKE saga.queue INCLUDING DEFAULTS)")
    # what an outbox of WAL records costs once it is read back: the messages
    # of a logical slot (a publication of no table leaves only them)
    c.query("CREATE PUBLICATION bench_no_tables")
    scripts = {
        "insert": "INSERT INTO bench_orders (note) VALUES ('%s');\n" % NOTE,
        "insert+publish": "INSERT INTO bench_orders (note) VALUES ('%s') \\; "
                          "SELECT saga.publish('bench.t', '%s');\n" % (NOTE, PAYLOAD),
        "insert+plain row": "INSERT INTO bench_orders (note) VALUES ('%s') \\; "
                            "INSERT INTO plain_outbox (message_id, destination, topic, payload,"
                            " next_attempt_at) VALUES (gen_random_uuid(), 'stalled', 'bench.t',"
                            " '%s', now());\n" % (NOTE, PAYLOAD),
        "insert+bare row": "INSERT INTO bench_orders (note) VALUES ('%s') \\; "
                           "INSERT INTO bare_outbox (message_id, destination, topic, payload,"
                           " next_attempt_at) VALUES (gen_random_uuid(), 'stalled', 'bench.t',"
                           " '%s', now());\n" % (NOTE, PAYLOAD),
        "insert+WAL record": "INSERT INTO bench_orders (note) VALUES ('%s') \\; "
                             "SELECT pg_logical_emit_message(true, 'bench.t', '%s');\n" % (NOTE, PAYLOAD),
        "insert+select 1": "INSERT INTO bench_orders (note) VALUES ('%s') \\; SELECT 1;\n" % NOTE,
    }
    scripts["insert+WAL decoded"] = scripts["insert+WAL record"]
    references = ["insert+plain row", "insert+bare row", "insert+WAL record", "insert+WAL decoded",
                  "insert+select 1"]
    files = {}
    for k, text in scripts.items():
        files[k] = os.path.join(cl.dir, k.replace("+", "_").replace(" ", "_") + ".sql")
        with open(files[k], "w") as f:
            f.write(text)
    cmd = ["pgbench", "-n", "-M", "simple", "-c", "8", "-j", "2", "-T", str(o.publish_seconds)]
    say("   destination: %s %s -- a listener that never answers: one request stays in"
        " flight, so the worker claims nothing more during the runs (each commit still"
        " wakes it for one short transaction)" % (url, opts))
    say("   business table: bench_orders (id bigserial PRIMARY KEY, note text), 200-byte note;"
        " payload: 200-byte JSON")
    say("   each transaction is one round trip (one simple-protocol query; the variants"
        " send both statements joined with \\;)")
    say("   wal_level = logical in this cluster, for insert+WAL decoded")
    say("   references, not targets: insert+plain row adds a row to plain_outbox (LIKE saga.queue"
        " INCLUDING DEFAULTS, CONSTRAINTS, INDEXES): the cost of a hand-rolled outbox row;"
        " insert+bare row adds the same row to a table with no index and no constraint: the floor"
        " of any outbox that writes a row in the user's transaction;"
        " insert+WAL record writes the payload to WAL only (pg_logical_emit_message): the floor of"
        " any outbox whose messages are durable at commit;"
        " insert+WAL decoded writes the same WAL record while pg_recvlogical streams a logical slot"
        " (pgoutput, messages only) to /dev/null: a walsender decodes the run's WAL as it is written,"
        " the least such an outbox costs once its messages are read (storing them for retries would"
        " cost more);"
        " insert+select 1 adds a statement that does nothing: the cost of any second statement")
    for k in scripts:
        say("   %-17s %s -f %s %s" % (k + ":", " ".join(cmd), files[k], " ".join(cl.conninfo_args())))
        say("   %-17s %s" % ("", abbreviate(scripts[k].strip())))

    tps = {k: [] for k in scripts}
    cpu = {k: [] for k in scripts}
    published = 0
    worker_share = []
    seq_sql = "SELECT last_value FROM bench_orders_id_seq"
    for r in range(o.publish_rounds):
        order = list(scripts) if r % 2 == 0 else list(reversed(list(scripts)))
        for k in order:
            c.query("CHECKPOINT")
            decoder = Decoder(cl, c) if k == "insert+WAL decoded" else None
            background = [worker] + ([decoder.pid] if decoder else [])
            p = subprocess.Popen(cmd + ["-f", files[k]] + cl.conninfo_args(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # server CPU per transaction, sampled inside the run: backends + worker (+ decoder)
            time.sleep(1)
            pids = [int(row[0]) for row in c.query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'")]
            n0, b0, w0, t0 = int(c.value(seq_sql)), sum_cpu(pids), sum_cpu(background), time.monotonic()
            time.sleep(max(1, o.publish_seconds - 2))
            n1, b1, w1, t1 = int(c.value(seq_sql)), sum_cpu(pids), sum_cpu(background), time.monotonic()
            out, err = p.communicate()
            if decoder:
                decoder.stop()
            if p.returncode != 0:
                raise BenchError("pgbench failed:\n" + out + err)
            m = re.search(r"tps = ([\d.]+)", out)
            n = re.search(r"number of transactions actually processed: (\d+)", out)
            if not m or not n:
                raise BenchError("could not read pgbench output:\n" + out)
            tps[k].append(float(m.group(1)))
            if None not in (b0, b1, w0, w1) and n1 > n0:
                cpu[k].append(((b1 - b0) / (n1 - n0) * 1e6, (w1 - w0) / (n1 - n0) * 1e6))
                if k == "insert+publish":
                    worker_share.append((w1 - w0) / (t1 - t0))
            if k == "insert+publish":
                published += int(n.group(1))
            say("   round %d %-17s %10s tps%s" % (
                r + 1, k, fmt_int(tps[k][-1]),
                "   server CPU %5.0f us/txn (backends %.0f + worker%s %.0f)"
                % (sum(cpu[k][-1]), cpu[k][-1][0], " and decoder" if k == "insert+WAL decoded" else "",
                   cpu[k][-1][1]) if cpu[k] else ""))

    queued = int(c.value("SELECT count(*) FROM saga.queue WHERE destination = 'stalled'"))
    if queued != published + 1:
        raise BenchError("expected %d queued messages, found %d" % (published + 1, queued))
    say("   check: %s messages queued for the stalled destination, as published" % fmt_int(queued))
    if worker_share:
        say("   saga worker CPU during the insert+publish runs: %.0f%% of one core (wake-ups)"
            % (100 * statistics.median(worker_share)))
    c.close()
    cl.stop()
    rounds = range(len(tps["insert"]))
    ratios = [tps["insert+publish"][i] / tps["insert"][i] for i in rounds]
    base, fig = statistics.median(tps["insert"]), statistics.median(tps["insert+publish"])
    ratio = statistics.median(ratios)
    say("   medians: insert %s tps, insert+publish %s tps; ratio %.2f (median of the per-round"
        " ratios %s)" % (fmt_int(base), fmt_int(fig), ratio, ", ".join("%.2f" % x for x in ratios)))
    for k in references:
        refs = [tps[k][i] / tps["insert"][i] for i in rounds]
        say("   reference %s: %.2f of insert (median of %s)"
            % (k, statistics.median(refs), ", ".join("%.2f" % x for x in refs)))
    if all(cpu.values()):
        med = {k: statistics.median(sum(x) for x in v) for k, v in cpu.items()}
        say("   server CPU per transaction (medians; less sensitive to other load than TPS): insert %.0f us, %s"
            % (med["insert"], ", ".join("%s %.0f us (CPU ratio %.2f)" % (k, med[k], med["insert"] / med[k])
                                         for k in ["insert+publish"] + references)))
    return [Row("publish overhead (tps)", fmt_int(fig) + " tps", fmt_int(base) + " tps",
                ratio, ">= 0.85", ratio >= 0.85)]


# ---------------------------------------------------------------- 2. notify

class Listener(threading.Thread):
    def __init__(self, conn, channel):
        super().__init__(daemon=True)
        self.conn = conn
        self.conn.query("LISTEN " + channel)
        self.stopping = False

    def run(self):
        while not self.stopping:
            self.conn.drain_notifications(0.1)

    @property
    def count(self):
        return self.conn.notifications


def bench_notify(ctx):
    o = ctx.opts
    n = o.notify_messages
    say("== NOTIFY dispatch: %s messages, %d round(s)" % (fmt_int(n), o.notify_rounds))
    cl = ctx.cluster("notify")
    c = cl.connect()
    cl.setup_saga(c)
    batch = int(c.value("SELECT current_setting('saga.batch_size')"))
    c.query("SELECT saga.create_destination('events', 'notify:bench_events')")
    c.query("SELECT saga.subscribe('bench.n', 'events')")
    c.query("CREATE TABLE bench_plain (id bigserial PRIMARY KEY, message_id uuid NOT NULL,"
            " topic text NOT NULL, key text, payload jsonb NOT NULL, headers jsonb)")
    drain_sql = (
        "CREATE PROCEDURE bench_drain(batch int) LANGUAGE plpgsql AS $$\n"
        "DECLARE n bigint;\n"
        "BEGIN\n"
        "  LOOP\n"
        "    WITH d AS (DELETE FROM bench_plain WHERE ctid = ANY (ARRAY(\n"
        "        SELECT ctid FROM bench_plain ORDER BY id LIMIT batch)) RETURNING *)\n"
        "    SELECT count(pg_notify('bench_events', row_to_json(d)::text)) INTO n FROM d;\n"
        "    COMMIT;\n"
        "    EXIT WHEN n = 0;\n"
        "  END LOOP;\n"
        "END $$")
    c.query(drain_sql)
    worker = cl.worker_pid(c)
    listener = Listener(cl.connect(), "bench_events")
    listener.start()
    say("   destination: notify:bench_events, subscribed to bench.n; saga.batch_size = %d" % batch)
    say("   one session LISTENs on bench_events during both runs and counts what arrives")
    say("   saga:     BEGIN; SELECT count(saga.publish('bench.n', <200-byte JSON>)) FROM"
        " generate_series(1, %d); COMMIT;  -- timed from COMMIT returned until saga.outbox is empty"
        " (probe every 5 ms: %s)" % (n, PENDING_PROBE))
    say("   baseline: the same rows in bench_plain (id bigserial PK, message_id, topic, key,"
        " payload, headers); SET synchronous_commit = off (as the worker); CALL bench_drain(%d):"
        % batch)
    for line in drain_sql.splitlines():
        say("             " + line)

    saga_rates, base_rates = [], []
    pub = cl.connect()

    def run_saga():
        c.query("CHECKPOINT")
        pub.query("BEGIN")
        pub.query("SELECT count(saga.publish('bench.n', '%s')) FROM generate_series(1, %d)" % (PAYLOAD, n))
        heard = listener.count
        cpu0 = cpu_seconds(worker)
        pub.query("COMMIT")
        t0 = time.monotonic()
        t1 = wait_drained(c, 60 + n / 500)
        cpu1 = cpu_seconds(worker)
        wait_until("the listener to hear every message", lambda: listener.count - heard >= n, 60, 0.05)
        if listener.count - heard != n:
            raise BenchError("listener heard %d notifications, expected %d" % (listener.count - heard, n))
        check_outbox_empty(c)
        rate = n / (t1 - t0)
        saga_rates.append(rate)
        say("   saga     %8.2f s  %10s events/s  (worker CPU %.2f s)" % (t1 - t0, fmt_int(rate), cpu1 - cpu0))

    def run_base():
        c.query("CHECKPOINT")
        pub.query("INSERT INTO bench_plain (message_id, topic, payload) SELECT gen_random_uuid(),"
                  " 'bench.n', '%s' FROM generate_series(1, %d)" % (PAYLOAD, n))
        pub.query("SET synchronous_commit = off")
        heard = listener.count
        backend = int(pub.value("SELECT pg_backend_pid()"))
        cpu0 = cpu_seconds(backend)
        t0 = time.monotonic()
        pub.query("CALL bench_drain(%d)" % batch)
        t1 = time.monotonic()
        cpu1 = cpu_seconds(backend)
        pub.query("RESET synchronous_commit")
        wait_until("the listener to hear every row", lambda: listener.count - heard >= n, 60, 0.05)
        if listener.count - heard != n or pub.value("SELECT count(*) FROM bench_plain") != "0":
            raise BenchError("baseline drain incomplete")
        rate = n / (t1 - t0)
        base_rates.append(rate)
        say("   baseline %8.2f s  %10s events/s  (session CPU %.2f s)" % (t1 - t0, fmt_int(rate), cpu1 - cpu0))

    for r in range(o.notify_rounds):
        for f in ((run_saga, run_base) if r % 2 == 0 else (run_base, run_saga)):
            f()
    listener.stopping = True
    listener.join()
    pub.close()
    c.close()
    cl.stop()
    fig, base = max(saga_rates), max(base_rates)
    ratio = fig / base
    return [Row("NOTIFY dispatch (events/s)", fmt_int(fig) + " ev/s", fmt_int(base) + " ev/s",
                ratio, ">= 0.5", ratio >= 0.5)]


# ---------------------------------------------------------------- 3. http

NGINX_CONF = """\
daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /nginx_status {{ stub_status; }}
        location / {{ return 200 'ok'; }}
    }}
}}
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "01936b2e-7f3a-7c41-9d2e-5b1a0c3d4e5f"
wrk.headers["Saga-Topic"] = "bench.h"
"""


def nginx_requests(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/nginx_status" % port, timeout=10) as r:
        text = r.read().decode()
    return int(text.splitlines()[2].split()[2])


def bench_http(ctx):
    o = ctx.opts
    n = o.http_messages
    say("== HTTP dispatch: %s messages, concurrency %d, %d round(s)" % (fmt_int(n), o.http_concurrency, o.http_rounds))
    cl = ctx.cluster("http")
    ndir = os.path.join(cl.dir, "nginx")
    os.makedirs(ndir)
    port = free_port()
    with open(os.path.join(ndir, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(dir=ndir, port=port))
    nginx = subprocess.Popen(["nginx", "-p", ndir, "-e", os.path.join(ndir, "error.log"),
                              "-c", os.path.join(ndir, "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx.kill_later(nginx)
    url = "http://127.0.0.1:%d/ok" % port

    def answers_post():
        try:
            req = urllib.request.Request(url, data=PAYLOAD.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200 and r.read() == b"ok"
        except OSError:
            return False
    wait_until("nginx to answer POST with 200", answers_post, 20, 0.1)

    lua = os.path.join(ndir, "post.lua")
    with open(lua, "w") as f:
        f.write(WRK_SCRIPT.format(body=PAYLOAD))
    wrk_cmd = ["wrk", "-t2", "-c8", "-d%ds" % o.wrk_seconds, "-s", lua, url]

    c = cl.connect()
    cl.setup_saga(c)
    opts = '{"concurrency": %d}' % o.http_concurrency
    c.query("SELECT saga.create_destination('sink', '%s', '%s')" % (url, opts))
    c.query("SELECT saga.subscribe('bench.h', 'sink')")
    worker = cl.worker_pid(c)
    say("   nginx %s (2 worker processes, access log off): location / { return 200 'ok'; }"
        % nginx_version())
    say("   config: %s" % os.path.join(ndir, "nginx.conf"))
    say("   saga:     saga.create_destination('sink', '%s', '%s'); %s messages of 200 bytes"
        " published in one transaction, timed from COMMIT returned until saga.outbox is empty" % (url, opts, fmt_int(n)))
    say("   baseline: %s" % " ".join(wrk_cmd))
    say("             post.lua: POST, the same 200-byte body, Content-Type, Idempotency-Key, Saga-Topic")

    # warm up: connections, plans
    c.query("SELECT count(saga.publish('bench.h', '%s')) FROM generate_series(1, 200)" % PAYLOAD)
    wait_drained(c, 60)
    pub = cl.connect()
    saga_rates, wrk_rates = [], []

    def run_saga():
        c.query("CHECKPOINT")
        pub.query("BEGIN")
        pub.query("SELECT count(saga.publish('bench.h', '%s')) FROM generate_series(1, %d)" % (PAYLOAD, n))
        before = nginx_requests(port)
        cpu0 = cpu_seconds(worker)
        pub.query("COMMIT")
        t0 = time.monotonic()
        t1 = wait_drained(c, 60 + n / 40)
        cpu1 = cpu_seconds(worker)
        got = nginx_requests(port) - before - 1
        check_outbox_empty(c)
        if got < n:
            raise BenchError("nginx counted %d requests, expected at least %d" % (got, n))
        rate = n / (t1 - t0)
        saga_rates.append(rate)
        say("   saga     %8.2f s  %10s requests/s  (worker CPU %.2f s; nginx counted %s requests)"
            % (t1 - t0, fmt_int(rate), cpu1 - cpu0, fmt_int(got)))

    def run_wrk():
        out = subprocess.run(wrk_cmd, check=True, capture_output=True, text=True).stdout
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m or "Non-2xx" in out:
            raise BenchError("unexpected wrk output:\n" + out)
        wrk_rates.append(float(m.group(1)))
        say("   wrk      %8d s  %10s requests/s" % (o.wrk_seconds, fmt_int(wrk_rates[-1])))

    for r in range(o.http_rounds):
        for f in ((run_saga, run_wrk) if r % 2 == 0 else (run_wrk, run_saga)):
            # a slow saga run is not repeated: the run must stay within its time budget
            if f is run_saga and saga_rates and n / min(saga_rates) > 60:
                say("   (saga run not repeated: the last one took more than 60 s)")
                continue
            f()
    pub.close()
    c.close()
    cl.stop()
    fig, base = max(saga_rates), max(wrk_rates)
    ratio = fig / base
    return [Row("HTTP dispatch (req/s)", fmt_int(fig) + " req/s", fmt_int(base) + " req/s (wrk)",
                ratio, ">= 0.3", ratio >= 0.3)]


def nginx_version():
    p = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (p.stderr or p.stdout).strip().split("/")[-1]


# ---------------------------------------------------------------- 4. latency

def percentile(sorted_values, p):
    """Nearest-rank percentile of a sorted list."""
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def bench_latency(ctx):
    o = ctx.opts
    total = int(o.latency_rate * o.latency_seconds)
    say("== latency: %s messages at %d/s (%d s)" % (fmt_int(total), o.latency_rate, o.latency_seconds))
    cl = ctx.cluster("latency")
    portfile = os.path.join(cl.dir, "receiver.port")
    outfile = os.path.join(cl.dir, "receiver.json")
    recv = subprocess.Popen([sys.executable, os.path.join(HERE, "receiver.py"),
                             "--port-file", portfile, "--out", outfile])
    ctx.kill_later(recv)
    wait_until("the receiver to listen", lambda: os.path.exists(portfile), 20, 0.05)
    with open(portfile) as f:
        port = int(f.read())
    url = "http://127.0.0.1:%d/latency" % port
    c = cl.connect()
    cl.setup_saga(c)
    c.query("SELECT saga.create_destination('receiver', '%s')" % url)
    c.query("SELECT saga.subscribe('bench.lat', 'receiver')")
    say("   receiver: bench/receiver.py (one thread, selectors) notes CLOCK_MONOTONIC when a"
        " request's first bytes are read")
    say("   publisher: one connection; per message  BEGIN; SELECT saga.publish('bench.lat',"
        " <200-byte JSON with \"n\">)  then  COMMIT, noting CLOCK_MONOTONIC just before sending"
        " COMMIT and just after it returns")
    say("   latency = arrival - COMMIT sent (an overestimate: it includes the commit's own"
        " time); arrival - COMMIT returned is a lower bound, negative when the worker delivers"
        " before the client has read COMMIT's answer")
    say("   destination: saga.create_destination('receiver', '%s') (default options)" % url)

    pub = cl.connect()
    # warm up: connection to the receiver, plans
    for i in range(20):
        pub.query("SELECT saga.publish('bench.lat', '%s')" % payload(-1 - i))
        time.sleep(0.02)
    wait_drained(c, 30)

    sent, returned = {}, {}
    interval = 1.0 / o.latency_rate
    start = time.monotonic() + 0.05
    for i in range(total):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.query("BEGIN; SELECT saga.publish('bench.lat', '%s')" % payload(i))
        t = time.monotonic()
        pub.query("COMMIT")
        sent[i], returned[i] = t, time.monotonic()
    achieved = total / (time.monotonic() - start)
    wait_drained(c, 60)
    check_outbox_empty(c)
    recv.send_signal(signal.SIGTERM)
    recv.wait(30)
    with open(outfile) as f:
        arrivals = {int(k): v for k, v in json.load(f).items()}
    missing = [i for i in range(total) if i not in arrivals]
    if missing:
        raise BenchError("%d messages never reached the receiver" % len(missing))
    lat = sorted((arrivals[i] - returned[i]) * 1000 for i in range(total))
    upper = sorted((arrivals[i] - sent[i]) * 1000 for i in range(total))
    commit = sorted((returned[i] - sent[i]) * 1000 for i in range(total))
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    say("   achieved rate %.1f messages/s; %d arrivals before COMMIT returned to the client"
        % (achieved, sum(1 for x in lat if x < 0)))
    say("   from COMMIT returned: p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms  min %.2f ms"
        % (p50, percentile(lat, 90), p99, lat[-1], lat[0]))
    say("   from COMMIT sent:     p50 %.2f ms  p99 %.2f ms  (COMMIT itself: p50 %.2f ms, p99 %.2f ms)"
        % (percentile(upper, 50), percentile(upper, 99), percentile(commit, 50), percentile(commit, 99)))
    pub.close()
    c.close()
    cl.stop()
    u50, u99 = percentile(upper, 50), percentile(upper, 99)
    return [Row("latency p50", "%.2f ms (lower %.2f)" % (u50, p50), "-", None, "<= 3 ms", u50 <= 3),
            Row("latency p99", "%.2f ms (lower %.2f)" % (u99, p99), "-", None, "<= 15 ms", u99 <= 15)]


# ---------------------------------------------------------------- 5. growth

def bench_growth(ctx):
    o = ctx.opts
    total, batch = o.growth_messages, o.growth_batch
    mark = 100000
    say("== table growth: %s messages in transactions of %s, NOTIFY destination, autovacuum on"
        % (fmt_int(total), fmt_int(batch)))
    cl = ctx.cluster("growth")
    c = cl.connect()
    cl.setup_saga(c)
    c.query("SELECT saga.create_destination('growth', 'notify:bench_growth')")
    c.query("SELECT saga.subscribe('bench.g', 'growth')")
    say("   publisher: SELECT count(saga.publish('bench.g', <200-byte JSON>)) FROM"
        " generate_series(1, %d), autocommit, each batch waiting until fewer than %d messages"
        " are pending (the figure is about dead space, not backlog); no listener" % (batch, batch))
    say("   size = pg_total_relation_size('saga.queue') (heap, indexes, TOAST), taken once the"
        " outbox is empty after the first %s and after all %s" % (fmt_int(mark), fmt_int(total)))
    say("   autovacuum on, autovacuum_naptime %s; saga.queue's own reloptions: %s"
        % (c.value("SELECT current_setting('autovacuum_naptime')"),
           c.value("SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = 'saga.queue'::regclass")))
    pub = cl.connect()
    size_sql = "SELECT pg_total_relation_size('saga.queue')"
    stats_sql = ("SELECT n_dead_tup, autovacuum_count, pg_relation_size('saga.queue'), n_tup_del"
                 " FROM pg_stat_user_tables WHERE relid = 'saga.queue'::regclass")
    backlog_sql = ("SELECT count(*) FROM (SELECT 1 FROM saga.queue WHERE status = 'pending'"
                   " LIMIT %d) s" % batch)
    sizes = {}
    peak = 0
    start = time.monotonic()
    published = 0
    next_mark = mark
    while published < total:
        wait_until("the backlog to fall below one batch",
                   lambda: int(c.value(backlog_sql)) < batch, 120, 0.01)
        peak = max(peak, int(c.value(size_sql)))
        pub.query("SELECT count(saga.publish('bench.g', '%s')) FROM generate_series(1, %d)" % (PAYLOAD, batch))
        published += batch
        if published >= next_mark or published >= total:
            next_mark = (published // mark + 1) * mark
            wait_drained(c, 120)
            size = int(c.value(size_sql))
            peak = max(peak, size)
            sizes[published] = size
            dead, vacuums, heap, deleted = c.query(stats_sql)[0]
            say("   %9s messages  %7.1f s  total %6.1f MB  (heap %6.1f MB; pg_stat_user_tables:"
                " n_tup_del %s, n_dead_tup %s, autovacuum_count %s)"
                % (fmt_int(published), time.monotonic() - start, size / 2**20, int(heap) / 2**20,
                   deleted, dead, vacuums))
    elapsed = time.monotonic() - start
    check_outbox_empty(c)
    say("   %s messages in %.1f s: %s messages/s through the outbox; peak size %.1f MB"
        % (fmt_int(total), elapsed, fmt_int(total / elapsed), peak / 2**20))
    pub.close()
    c.close()
    cl.stop()
    first, last = sizes[min(sizes)], sizes[max(sizes)]
    ratio = last / first
    return [Row("table growth (size)", "%.1f MB at %s" % (last / 2**20, short(max(sizes))),
                "%.1f MB at %s" % (first / 2**20, short(min(sizes))), ratio, "<= 2", ratio <= 2)]


# ---------------------------------------------------------------- 6. sagas

SAGA_SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.s1 (id bigserial PRIMARY KEY, saga uuid, note text);
CREATE TABLE shop.s2 (id bigserial PRIMARY KEY, saga uuid, note text);
CREATE TABLE shop.s3 (id bigserial PRIMARY KEY, saga uuid, note text);
CREATE FUNCTION shop.step1(ctx jsonb) RETURNS jsonb LANGUAGE sql AS
  $$ INSERT INTO shop.s1 (saga, note) VALUES ((ctx->>'saga_id')::uuid, 'one') RETURNING '{}'::jsonb $$;
CREATE FUNCTION shop.step2(ctx jsonb) RETURNS jsonb LANGUAGE sql AS
  $$ INSERT INTO shop.s2 (saga, note) VALUES ((ctx->>'saga_id')::uuid, 'two') RETURNING '{}'::jsonb $$;
CREATE FUNCTION shop.step3(ctx jsonb) RETURNS jsonb LANGUAGE sql AS
  $$ INSERT INTO shop.s3 (saga, note) VALUES ((ctx->>'saga_id')::uuid, 'three') RETURNING '{}'::jsonb $$;
SELECT saga.define('bench3', '{"steps": [{"name": "one", "action": "shop.step1"},
  {"name": "two", "action": "shop.step2"}, {"name": "three", "action": "shop.step3"}]}');
"""

THREE_INSERTS = ("BEGIN;\nINSERT INTO shop.s1 (note) VALUES ('one');\n"
                 "INSERT INTO shop.s2 (note) VALUES ('two');\n"
                 "INSERT INTO shop.s3 (note) VALUES ('three');\nCOMMIT;\n")


def run_pgbench(cl, script_path, seconds):
    cmd = ["pgbench", "-n", "-M", "simple", "-c", "8", "-j", "2", "-T", str(seconds)]
    p = subprocess.run(cmd + ["-f", script_path] + cl.conninfo_args(), capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError("pgbench failed:\n" + p.stdout + p.stderr)
    m = re.search(r"tps = ([\d.]+)", p.stdout)
    if not m:
        raise BenchError("could not read pgbench output:\n" + p.stdout)
    return float(m.group(1)), cmd


def write_script(cl, name, text):
    path = os.path.join(cl.dir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def run_sagas(c, worker, n):
    """Start n sagas in one transaction and wait until no saga has work left;
    check that n more completed and left their 3n step rows. Returns seconds
    of the start transaction, seconds from its COMMIT until done, and the
    worker's CPU seconds (None if unreadable)."""
    c.query("TRUNCATE shop.s1, shop.s2, shop.s3")
    before = int(c.value("SELECT count(*) FROM saga.instances WHERE status = 'completed'"))
    w0 = cpu_seconds(worker)
    ts = time.monotonic()
    c.query("SELECT saga.start('bench3', jsonb_build_object('n', g)) FROM generate_series(1, %d) g"
            % n)
    t0 = time.monotonic()
    wait_until("every saga to complete", lambda: c.value(
        "SELECT 1 FROM saga.instances WHERE next_run_at IS NOT NULL LIMIT 1") is None, 600, 0.01)
    elapsed = time.monotonic() - t0
    w1 = cpu_seconds(worker)
    done, rows = c.query("SELECT (SELECT count(*) FROM saga.instances WHERE status = 'completed'),"
                         " (SELECT count(*) FROM shop.s1) + (SELECT count(*) FROM shop.s2)"
                         " + (SELECT count(*) FROM shop.s3)")[0]
    done = int(done) - before
    if done != n or int(rows) != 3 * n:
        raise BenchError("expected %d completed sagas and %d step rows, found %d and %s"
                         % (n, 3 * n, done, rows))
    say("   check: %d sagas completed, %s step rows" % (done, rows))
    return t0 - ts, elapsed, None if None in (w0, w1) else w1 - w0


def bench_sagas(ctx):
    o = ctx.opts
    say("== saga throughput: %s three-step sagas (each step inserts one row), started in one"
        " transaction, completed sagas/s; baseline: pgbench 8 clients, the same three inserts in"
        " one transaction per saga, %d s" % (fmt_int(o.saga_count), o.saga_seconds))
    cl = ctx.cluster("sagas")
    c = cl.connect()
    cl.setup_saga(c)
    c.query(SAGA_SCHEMA)
    script = write_script(cl, "three_inserts.sql", THREE_INSERTS)
    base, cmd = run_pgbench(cl, script, o.saga_seconds)
    say("   baseline: %s -f %s %s" % (" ".join(cmd), script, " ".join(cl.conninfo_args())))
    say("   baseline: %s transactions/s (= sagas/s)" % fmt_int(base))
    worker = cl.worker_pid(c)
    say("   saga run: SELECT saga.start('bench3', ...) FROM generate_series(1, %d); COMMIT; then"
        " wait until no saga has work left" % o.saga_count)
    start_s, elapsed, cpu = run_sagas(c, worker, o.saga_count)
    rate = o.saga_count / elapsed
    say("   %s sagas completed in %.2f s: %s sagas/s; worker CPU %.0f us per saga"
        % (fmt_int(o.saga_count), elapsed, fmt_int(rate),
           cpu / o.saga_count * 1e6 if cpu is not None else float("nan")))
    # for the DBOS comparison: DBOS's figure includes starting its workflows,
    # so this one includes the start transaction
    rate_started = o.saga_count / (start_s + elapsed)
    say("   including the start transaction (%.2f s): %s sagas/s"
        % (start_s, fmt_int(rate_started)))
    ratio = rate / base
    rows_out = [Row("saga throughput", fmt_int(rate) + " sagas/s", fmt_int(base) + " tps", ratio,
                    ">= 0.5", ratio >= 0.5)]
    rows_out.append(bench_dbos(ctx, cl, c, worker, rate_started))
    c.close()
    cl.stop()
    return rows_out


DBOS_DIR = os.path.join(HERE, "dbos")
DBOS_SCRIPT = os.path.join(DBOS_DIR, "workflow.mjs")


def dbos_missing():
    """Why the DBOS comparison cannot run here, or None."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed"
    try:
        v = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return "node --version failed: %s" % e
    m = re.match(r"v(\d+)\.", v.strip())
    if not m or int(m.group(1)) < 20:
        return "node %s is too old (@dbos-inc/dbos-sdk needs node >= 20)" % v.strip()
    if not os.path.isfile(os.path.join(DBOS_DIR, "node_modules", "@dbos-inc", "dbos-sdk",
                                       "package.json")):
        return "bench/dbos/node_modules is missing (as root: scripts/install-deps --bench)"
    return None


def run_dbos(cl, c, o, sysdb):
    """One run of bench/dbos/workflow.mjs with a fresh system database; its
    DBOS_RESULT, or a BenchError."""
    c.query("CREATE DATABASE " + sysdb)
    c.query("CHECKPOINT")
    cmd = ["node", "--no-deprecation", DBOS_SCRIPT, "--host", cl.dir, "--port", str(cl.port),
           "--user", cl.user, "--app-db", "bench", "--system-db", sysdb,
           "--workflows", str(o.dbos_workflows), "--concurrency", str(o.dbos_concurrency)]
    try:
        p = subprocess.run(cmd, cwd=DBOS_DIR, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise BenchError("the DBOS run timed out after 900 s: " + " ".join(cmd))
    result = None
    for line in p.stdout.splitlines():
        if line.startswith("DBOS_RESULT "):
            result = json.loads(line[len("DBOS_RESULT "):])
    for line in p.stderr.splitlines():
        if line.startswith("dbos: "):
            say("   " + line)
    if p.returncode != 0 or result is None or not result.get("ok"):
        raise BenchError("the DBOS run failed (exit status %d): %s\n%s"
                         % (p.returncode, " ".join(cmd), (p.stdout + p.stderr)[-3000:]))
    say("   DBOS: %s workflows in %.2f s: %s workflows/s; check: %s rows, one per workflow and"
        " table" % (fmt_int(result["workflows"]), result["seconds"],
                    fmt_int(result["workflows_per_second"]), fmt_int(result["rows"])))
    return cmd, result


def bench_dbos(ctx, cl, c, worker, saga_rate):
    """DBOS Transact on the sagas cluster: the same three inserts as a DBOS
    workflow of three steps (bench/dbos/workflow.mjs), against sagas/s
    including their start transaction. With dbos_rounds > 1 the saga run and
    the DBOS run alternate and the best of each is kept."""
    o = ctx.opts
    name, target = "saga vs DBOS (x)", ">= 10"
    if o.dbos_workflows <= 0 or o.dbos_rounds <= 0:
        say("   DBOS comparison: skipped (--dbos-workflows or --dbos-rounds is 0)")
        return Row(name, "skipped", "-", None, target, True, skipped=True)
    missing = dbos_missing()
    if missing:
        say("   DBOS comparison: skipped: %s" % missing)
        return Row(name, "skipped", "-", None, target, True, skipped=True)
    say("   DBOS comparison, %d round(s) on this cluster (saga run, then DBOS run; best of each):"
        " workflow bench3 = three DBOS steps (DBOS.registerStep), each one INSERT into"
        " dbosbench.s1/s2/s3 (id bigserial PK, workflow text, note text) of database bench;"
        " a fresh system database on the same server per run; %s workflows started with"
        " DBOS.startWorkflow, %d in flight, after 50 untimed ones; timed from the first start"
        " until the last result" % (o.dbos_rounds, fmt_int(o.dbos_workflows), o.dbos_concurrency))
    saga_rates, dbos_rates = [saga_rate], []
    try:
        for r in range(o.dbos_rounds):
            if r > 0:
                start_s, elapsed, _ = run_sagas(c, worker, o.saga_count)
                saga_rates.append(o.saga_count / (start_s + elapsed))
            say("   round %d saga: %s sagas/s (start transaction included)"
                % (r + 1, fmt_int(saga_rates[-1])))
            cmd, result = run_dbos(cl, c, o, "dbos_sys_%d" % (r + 1))
            dbos_rates.append(result["workflows_per_second"])
            say("   round %d DBOS: %s workflows/s" % (r + 1, fmt_int(dbos_rates[-1])))
    except (BenchError, PgError) as e:
        ctx.errors.append(("sagas (DBOS)", str(e)))
        say("   ERROR: %s" % e)
        return Row(name, "error", "-", None, target, False)
    say("   DBOS command: %s  (cwd %s)" % (" ".join(cmd), DBOS_DIR))
    say("   DBOS: @dbos-inc/dbos-sdk %s, node %s, pools of %d connections"
        % (result["sdk"], result["node"], result["pool_size"]))
    best_saga, best_dbos = max(saga_rates), max(dbos_rates)
    ratio = best_saga / best_dbos
    say("   best of each: saga %s sagas/s / DBOS %s workflows/s = %.1f"
        % (fmt_int(best_saga), fmt_int(best_dbos), ratio))
    return Row(name, fmt_int(best_saga) + " sagas/s", fmt_int(best_dbos) + " wf/s (DBOS)", ratio,
               target, ratio >= 10)


def bench_start(ctx):
    o = ctx.opts
    say("== start overhead: pgbench, 8 clients, %d s per run, %d rounds; business insert vs the"
        " same plus saga.start() (the worker does not run in this database, as publish's"
        " destination never answers: the figure is the cost of starting)"
        % (o.start_seconds, o.start_rounds))
    cl = ctx.cluster("start")
    c = cl.connect()
    c.query("CREATE EXTENSION saga")
    c.query("ALTER SYSTEM SET saga.databases = 'postgres'")
    c.query("SELECT pg_reload_conf()")
    c.query(SAGA_SCHEMA)
    c.query("CREATE TABLE bench_orders (id bigserial PRIMARY KEY, note text NOT NULL)")
    scripts = {
        "insert": "INSERT INTO bench_orders (note) VALUES ('%s');\n" % NOTE,
        "insert+start": "INSERT INTO bench_orders (note) VALUES ('%s') \\; "
                        "SELECT saga.start('bench3', '%s');\n" % (NOTE, PAYLOAD),
    }
    files = {k: write_script(cl, k.replace("+", "_") + ".sql", v) for k, v in scripts.items()}
    tps = {k: [] for k in scripts}
    for r in range(o.start_rounds):
        order = list(scripts) if r % 2 == 0 else list(reversed(list(scripts)))
        for k in order:
            c.query("CHECKPOINT")
            t, cmd = run_pgbench(cl, files[k], o.start_seconds)
            tps[k].append(t)
            say("   round %d %-13s %10s tps" % (r + 1, k, fmt_int(t)))
    say("   commands: %s -f <script> %s" % (" ".join(cmd), " ".join(cl.conninfo_args())))
    for k in scripts:
        say("   %-13s %s" % (k + ":", abbreviate(scripts[k].strip())))
    ratios = [tps["insert+start"][i] / tps["insert"][i] for i in range(o.start_rounds)]
    ratio = statistics.median(ratios)
    base, fig = statistics.median(tps["insert"]), statistics.median(tps["insert+start"])
    say("   medians: insert %s tps, insert+start %s tps; ratio %.2f (per round %s)"
        % (fmt_int(base), fmt_int(fig), ratio, ", ".join("%.2f" % x for x in ratios)))
    c.close()
    cl.stop()
    return [Row("start overhead (tps)", fmt_int(fig) + " tps", fmt_int(base) + " tps", ratio,
                ">= 0.85", ratio >= 0.85)]


def bench_saga_latency(ctx):
    o = ctx.opts
    say("== saga latency: %d three-step local sagas at %d/s; start COMMIT returned -> the worker"
        " finished the saga (saga.instances.finished_at, clock_timestamp() in the worker)"
        % (o.saga_latency_count, o.saga_latency_rate))
    cl = ctx.cluster("saga_latency")
    c = cl.connect()
    cl.setup_saga(c)
    c.query(SAGA_SCHEMA)
    pub = cl.connect()
    for i in range(20):
        pub.query("SELECT saga.start('bench3', '{}')")
    interval = 1.0 / o.saga_latency_rate
    returned = {}
    start = time.monotonic() + 0.05
    for i in range(o.saga_latency_count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sid = pub.value("SELECT saga.start('bench3', '{\"n\": %d}')" % i)
        returned[sid] = time.time()
    wait_until("every saga to complete", lambda: c.value(
        "SELECT 1 FROM saga.instances WHERE next_run_at IS NOT NULL LIMIT 1") is None, 120, 0.01)
    lat = []
    for sid, status, fin in c.query("SELECT id, status, extract(epoch FROM finished_at)"
                                    " FROM saga.instances WHERE input ? 'n'"):
        if status != "completed":
            raise BenchError("saga %s ended %s" % (sid, status))
        lat.append((float(fin) - returned[sid]) * 1000)
    lat.sort()
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    say("   start -> completed: p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms"
        % (p50, percentile(lat, 90), p99, lat[-1]))
    pub.close()
    c.close()
    cl.stop()
    return [Row("saga latency p50", "%.2f ms" % p50, "-", None, "<= 10 ms", p50 <= 10),
            Row("saga latency p99", "%.2f ms" % p99, "-", None, "-", True)]


def dest_url(cl):
    """A postgresql:// URL for cl's database bench, over its Unix socket."""
    return "postgresql:///bench?host=%s&port=%d&user=%s" % (cl.dir, cl.port, cl.user)


REMOTE_BATCH = 500      # saga.batch_size: the worker's messages per statement


def bench_remote(ctx):
    o = ctx.opts
    n = o.remote_messages
    say("== remote delivery: %d committed messages (200-byte payloads) from one cluster's outbox"
        " into another cluster's inbox (postgresql:// destination, trivial handler) vs one session"
        " inserting the same rows into a table of that cluster, %d per statement" % (n, REMOTE_BATCH))
    recv = ctx.cluster("remote_receiver")
    r = recv.connect()
    recv.setup_saga(r)
    r.query("CREATE FUNCTION public.ignore(m jsonb) RETURNS void LANGUAGE sql AS 'SELECT NULL';"
            "SELECT saga.handle('bench.*', 'public.ignore(jsonb)');"
            "CREATE TABLE public.sink (id uuid PRIMARY KEY, topic text, payload jsonb, key text, headers jsonb)")
    send = ctx.cluster("remote_sender")
    c = send.connect()
    send.setup_saga(c)
    c.query("SELECT saga.create_destination('receiver', '%s');"
            "SELECT saga.subscribe('bench.*', 'receiver')" % dest_url(recv))
    # the baseline: the same rows, the same kind of connection, batches of the same size
    rows = [(str(i), payload(i)) for i in range(n)]
    b = recv.connect()
    t0 = time.monotonic()
    for i in range(0, n, REMOTE_BATCH):
        chunk = rows[i:i + REMOTE_BATCH]
        with b.conn.cursor() as cur:
            cur.execute("INSERT INTO public.sink SELECT gen_random_uuid(), 'bench.row', p::jsonb, NULL, NULL"
                        " FROM unnest(%s::text[]) p", ([p for _, p in chunk],))
    base_rate = n / (time.monotonic() - t0)
    b.close()
    say("   baseline: %s rows/s" % fmt_int(base_rate))
    # the outbox: n messages committed at once, then drained by the worker
    c.query("BEGIN; SELECT count(saga.publish('bench.row', p::jsonb)) FROM unnest(ARRAY[%s]) p; COMMIT"
            % ",".join("'%s'" % p.replace("'", "''") for _, p in rows))
    t0 = time.monotonic()
    wait_drained(c, 600)
    delivered = time.monotonic() - t0
    wait_until("every message to be handled", lambda: r.value(
        "SELECT count(*) FROM saga.inbox_messages WHERE processed_at IS NOT NULL") == str(n), 600, 0.02)
    handled = time.monotonic() - t0
    check_outbox_empty(c)
    got = r.value("SELECT count(DISTINCT message_id) FROM saga.inbox_messages")
    if got != str(n):
        raise BenchError("the receiver has %s distinct messages, not %d" % (got, n))
    rate, hrate = n / delivered, n / handled
    say("   saga: %s messages/s into the remote inbox, %s/s handled there" % (fmt_int(rate), fmt_int(hrate)))
    r.close()
    c.close()
    return [Row("remote delivery", "%s msg/s" % fmt_int(rate), "%s rows/s" % fmt_int(base_rate),
                rate / base_rate, ">= 0.50", rate / base_rate >= 0.5),
            Row("remote, handled", "%s msg/s" % fmt_int(hrate), "%s rows/s" % fmt_int(base_rate),
                hrate / base_rate, "-", True)]


def bench_remote_latency(ctx):
    o = ctx.opts
    say("== remote saga latency: %d sagas one after another, each reserve (products cluster) ->"
        " ship (delivery cluster) -> confirm (local); start COMMIT returned -> completed" % o.remote_sagas)
    remote = {}
    for name, fn in (("products", "shop.reserve"), ("delivery", "ship.create")):
        cl = ctx.cluster("remote_" + name)
        rc = cl.connect()
        cl.setup_saga(rc)
        schema = fn.split(".")[0]
        rc.query("CREATE SCHEMA %s; CREATE TABLE %s.effects (saga uuid, at timestamptz DEFAULT clock_timestamp());"
                 "CREATE FUNCTION %s(ctx jsonb) RETURNS jsonb LANGUAGE sql AS"
                 " $$ INSERT INTO %s.effects (saga) VALUES ((ctx->>'saga_id')::uuid) RETURNING '{}'::jsonb $$"
                 % (schema, schema, fn, schema))
        remote[name] = (cl, rc)
    cl = ctx.cluster("remote_orders")
    c = cl.connect()
    cl.setup_saga(c)
    c.query("CREATE SCHEMA shop; CREATE TABLE shop.confirmed (saga uuid);"
            "CREATE FUNCTION shop.confirm(ctx jsonb) RETURNS jsonb LANGUAGE sql AS"
            " $$ INSERT INTO shop.confirmed VALUES ((ctx->>'saga_id')::uuid) RETURNING '{}'::jsonb $$;"
            "SELECT saga.create_destination('products', '%s');"
            "SELECT saga.create_destination('delivery', '%s');"
            % (dest_url(remote["products"][0]), dest_url(remote["delivery"][0])))
    c.query("""SELECT saga.define('order3', '{"steps": [
        {"name": "reserve", "action": {"destination": "products", "function": "shop.reserve"}},
        {"name": "ship", "action": {"destination": "delivery", "function": "ship.create"}},
        {"name": "confirm", "action": "shop.confirm"}]}')""")
    pub = cl.connect()
    lat = []
    for i in range(o.remote_sagas + 10):
        sid = pub.value("SELECT saga.start('order3', '{}')")
        returned = time.time()
        wait_until("saga %s to complete" % sid, lambda: c.value(
            "SELECT status FROM saga.instances WHERE id = '%s'" % sid) in ("completed", "failed", "compensated"),
            60, 0.001)
        status, fin = c.query("SELECT status, extract(epoch FROM finished_at) FROM saga.instances"
                              " WHERE id = '%s'" % sid)[0]
        if status != "completed":
            raise BenchError("saga %s ended %s" % (sid, status))
        if i >= 10:             # the first ones open the connections
            lat.append((float(fin) - returned) * 1000)
    for name, (rcl, rc) in remote.items():
        got = rc.value("SELECT count(*) = count(DISTINCT saga) FROM %s.effects"
                       % ("shop" if name == "products" else "ship"))
        if got != "t":
            raise BenchError("a remote effect in %s happened twice" % name)
        rc.close()
    lat.sort()
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    say("   start -> completed: p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms"
        % (p50, percentile(lat, 90), p99, lat[-1]))
    pub.close()
    c.close()
    return [Row("3-service saga latency p50", "%.2f ms" % p50, "-", None, "-", True),
            Row("3-service saga latency p99", "%.2f ms" % p99, "-", None, "-", True)]


def short(n):
    return "%dk" % (n // 1000) if n < 10**6 else "%gM" % (n / 10**6)


# ---------------------------------------------------------------- driver

class Context:
    def __init__(self, opts, base):
        self.opts = opts
        self.base = base
        self.clusters = []
        self.procs = []
        self.kept = []
        self.errors = []

    def cluster(self, name, settings=()):
        cl = Cluster(self.base, name, list(settings) + self.opts.extra_conf)
        self.clusters.append(cl)
        return cl

    def keep(self, obj):
        self.kept.append(obj)

    def kill_later(self, proc):
        self.procs.append(proc)

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs = []
        for cl in self.clusters:
            cl.stop()
        for s in self.kept:
            s.close()
        self.kept = []


RUNNERS = {"publish": bench_publish, "notify": bench_notify, "http": bench_http,
           "latency": bench_latency, "growth": bench_growth, "sagas": bench_sagas,
           "start": bench_start, "saga_latency": bench_saga_latency,
           "remote": bench_remote, "remote_latency": bench_remote_latency}


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="Run saga's benchmarks; print each figure against a same-run baseline.",
        epilog="Exit status: 0 all targets met, 1 a target missed, 2 a benchmark failed to run.")
    ap.add_argument("benchmarks", nargs="*", metavar="NAME",
                    help="any of %s (default: all)" % ", ".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="small sizes, for a quick check")
    ap.add_argument("--keep", action="store_true", help="keep the clusters' directories and logs")
    ap.add_argument("--out", help="directory for results.txt / results.json")
    ap.add_argument("--revision", default="unknown", help="the source revision, for the header")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an extra postgresql.conf setting for every cluster (repeatable),"
                         " e.g. --set autovacuum_naptime=10s")
    for k, v in SIZES["full"].items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help="default %s (quick: %s)" % (v, SIZES["quick"][k]))
    opts = ap.parse_args(argv)
    for b in opts.benchmarks:
        if b not in BENCHMARKS:
            ap.error("unknown benchmark %r (choose from %s)" % (b, ", ".join(BENCHMARKS)))
    opts.extra_conf = []
    for item in opts.set:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            ap.error("--set wants NAME=VALUE, not %r" % item)
        opts.extra_conf.append((name.strip(), value.strip()))
    sizes = SIZES["quick" if opts.quick else "full"]
    for k, v in sizes.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    return opts


def main(argv):
    opts = parse_args(argv)
    todo = [b for b in BENCHMARKS if not opts.benchmarks or b in opts.benchmarks]
    base = tempfile.mkdtemp(prefix="saga-bench.")
    ctx = Context(opts, base)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(2))
    pgver = subprocess.run(["postgres", "--version"], capture_output=True, text=True).stdout.strip()
    say("saga benchmarks (%s) -- %s" % ("quick" if opts.quick else "full", time.strftime("%Y-%m-%d %H:%M:%S")))
    say("source: %s" % opts.revision)
    say("machine: %s, %d CPUs, %s; %s" % (platform.node(), os.cpu_count(), platform.release(), pgver))
    say("clusters: %s/<benchmark>, one fresh cluster per benchmark, initdb -A trust -E UTF8 --locale=C" % base)
    say("postgresql.conf: " + ", ".join("%s=%s" % kv for kv in CONF + opts.extra_conf))
    say("sizes: " + ", ".join("%s=%s" % (k, getattr(opts, k)) for k in SIZES["full"]))
    say("publish: median of per-round ratios; notify, http: best run of each side; load from"
        " other processes on the machine lowers both sides, not always equally")
    say()
    rows, errors = [], []
    try:
        for b in todo:
            t = time.monotonic()
            try:
                rows += RUNNERS[b](ctx)
            except (BenchError, PgError, subprocess.CalledProcessError, OSError) as e:
                msg = str(e)
                if isinstance(e, subprocess.CalledProcessError):
                    msg += "\n" + (e.stderr or "") + (e.stdout or "")
                errors.append((b, msg))
                say("   ERROR: %s" % msg)
                rows.append(Row(b, "error", "-", None, "-", False))
            finally:
                ctx.cleanup()
            say("   (%s took %.0f s)" % (b, time.monotonic() - t))
            say()
    finally:
        ctx.cleanup()
        errors += ctx.errors
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say("kept: %s" % base)
    table = print_table(rows)
    say(table)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "results.txt"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(opts.out, "results.json"), "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    if errors:
        return 2
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""The demo's report: what happened to each message, told from what the
receivers saw (the HTTP receiver's JSON log, the LISTEN client's output) and
what the database says (saga.dead_letters, saga.outbox, saga.metrics()); then
each saga's timeline, from saga.get() and the HTTP requests its steps made; then
the chain of events the inbox handlers ran (saga.inbox and shop.effects).

It also checks the story's promises and exits 1 if one was broken.

    report.py story        REQUESTS NOTIFICATIONS T0
    report.py redeliver    REQUESTS MESSAGE_ID DESTINATION EXPECT(dead|delivered) AFTER
    report.py sagas        REQUESTS
    report.py choreography T0

psql reaches the demo's cluster through PGHOST, PGPORT, PGUSER and PGDATABASE.
"""
import json
import os
import subprocess
import sys
from datetime import datetime
from urllib.parse import urlsplit

# What scripts/demo publishes. Every payload carries its order number, which is
# how a delivery is matched to the message it came from.
STORY = [
    # order, topic, key, committed
    (1, "order.placed", "order-1", True),
    (2, "order.placed", "order-2", True),
    (3, "order.placed", "order-3", False),
    (4, "order.placed", "order-4", True),
    (4, "order.paid", "order-4", True),
    (2, "order.payment_due", "order-2", True),
]
DELAYED_TOPIC = "order.payment_due"
ROLLED_BACK_ORDER = 3

# How each destination of the story behaves.
EXPECT = {
    "shipping": ("delivered", 0),     # answers 200
    "billing": ("delivered", 2),      # /flaky/2: 500 twice per message, then 200
    "legacy": ("dead", 400),          # answers 400: straight to the dead letters
    "orders_feed": ("notified", 0),   # NOTIFY orders
}

TTY = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
GREEN, RED, DIM, BOLD, RESET = (("\033[32m", "\033[31m", "\033[2m", "\033[1m", "\033[0m")
                                if TTY else ("", "", "", "", ""))

failures = []
passes = []


def check(ok, text, detail=""):
    if ok:
        passes.append(text)
        print("  %s✓%s %s" % (GREEN, RESET, text))
    else:
        failures.append(text)
        print("  %s✗ %s%s" % (RED, text, RESET))
        if detail:
            for line in detail.splitlines():
                print("      " + line)


def psql_json(sql):
    """Rows of a query as a list of dicts."""
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
         "-c", "SELECT coalesce(json_agg(r), '[]') FROM (%s) r" % sql],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def read_jsonl(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.endswith("}"):
                    rows.append(json.loads(line))
    return rows


def read_requests(path):
    """The HTTP receiver's log: one dict per request, body parsed."""
    reqs = read_jsonl(path)
    for r in reqs:
        try:
            r["payload"] = json.loads(r["body"])
        except ValueError:
            r["payload"] = None
        r["id"] = r["headers"].get("Idempotency-Key")
        r["topic"] = r["headers"].get("Saga-Topic")
    return reqs


def read_notifications(path):
    """The LISTEN client's output: `<time> <channel> <payload>` per line."""
    notes = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 2)
                if len(parts) < 3:
                    continue
                env = json.loads(parts[2])
                notes.append({"time": float(parts[0]), "channel": parts[1], "raw": parts[2],
                              "envelope": env, "id": env.get("id"), "topic": env.get("topic"),
                              "payload": env.get("payload")})
    return notes


def order_of(payload):
    return payload.get("order") if isinstance(payload, dict) else None


def matches(pattern, topic):
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return topic.startswith(pattern[:-1])
    return pattern == topic


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    print(BOLD + line(headers) + RESET)
    print("  " + "  ".join("─" * w for w in widths))
    for r in rows:
        print(line(r))


def plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def story(requests_path, notes_path, t0):
    t0 = float(t0)
    reqs = read_requests(requests_path)
    notes = read_notifications(notes_path)
    dests = {d["name"]: d for d in psql_json(
        "SELECT name, kind, target FROM saga.destinations ORDER BY name")}
    subs = psql_json("SELECT pattern, destination FROM saga.subscriptions")
    dead = psql_json("SELECT message_id, topic, key, destination, attempts, last_error, last_status,"
                     " payload FROM saga.dead_letters")
    pending = psql_json("SELECT message_id, topic, key, destination, status FROM saga.outbox")
    path_of = {urlsplit(d["target"]).path: name for name, d in dests.items() if d["kind"] == "http"}

    # --- the HTTP requests, as the receiver saw them
    print("%sHTTP requests, as test/http_receiver.py logged them%s (time since the first commit):" % (BOLD, RESET))
    rows = []
    for r in reqs:
        rows.append(["+%.3fs" % (r["time"] - t0), path_of.get(r["path"], r["path"]), r["path"],
                     r["topic"], order_of(r["payload"]), r["status"]])
    table(["time", "destination", "path", "Saga-Topic", "order", "answer"], rows)
    print()
    print("%sNotifications the LISTEN client received on channel \"orders\":%s" % (BOLD, RESET))
    for n in notes:
        print("  +%.3fs  %s" % (n["time"] - t0, n["raw"]))
    if not notes:
        print("  (none)")
    print()

    # --- one row per message and destination
    results = []       # (message, destination, outcome text, ok)
    ids = {}           # (order, topic) -> message ids seen anywhere
    per_dest_times = {}  # (dest, order, topic) -> (first request time, delivered time)
    per_dest_pos = {}    # (notify dest, order, topic) -> position in the listener's output
    rows = []
    for order, topic, key, committed in STORY:
        if not committed:
            continue
        targets = sorted({s["destination"] for s in subs if matches(s["pattern"], topic)})
        first = True
        for dname in targets:
            kind = dests[dname]["kind"]
            want, want_n = EXPECT.get(dname, ("delivered", 0))
            if kind == "notify":
                got = [n for n in notes if n["topic"] == topic and order_of(n["payload"]) == order]
                for n in got:
                    ids.setdefault((order, topic), set()).add(n["id"])
                wrong_key = [n for n in got if n["envelope"].get("key") != key]
                if got:
                    channel = dests[dname]["target"]
                    channel = channel[len("notify:"):] if channel.startswith("notify:") else channel
                    outcome, ok = "notified on channel \"%s\"" % channel, want == "notified" and not wrong_key
                    if wrong_key:
                        outcome += " with key %s" % wrong_key[0]["envelope"].get("key")
                    if len(got) > 1:
                        outcome += " (%d times)" % len(got)
                    per_dest_times[(dname, order, topic)] = (got[0]["time"], got[0]["time"])
                    per_dest_pos[(dname, order, topic)] = notes.index(got[0])
                else:
                    outcome, ok = "NOT NOTIFIED", False
            else:
                path = urlsplit(dests[dname]["target"]).path
                got = [r for r in reqs if r["path"] == path and r["topic"] == topic
                       and order_of(r["payload"]) == order]
                for r in got:
                    ids.setdefault((order, topic), set()).add(r["id"])
                ok_reqs = [r for r in got if 200 <= r["status"] < 300]
                failed = [r for r in got if not 200 <= r["status"] < 300]
                dl = [d for d in dead if d["destination"] == dname and d["topic"] == topic
                      and order_of(d["payload"]) == order]
                if dl:
                    d = dl[0]
                    outcome = "dead-lettered after %s: %s" % (plural(d["attempts"], "attempt"), d["last_error"])
                    ok = (want == "dead" and d["last_status"] == want_n and len(got) == d["attempts"]
                          and d["key"] == key)
                elif ok_reqs:
                    if failed:
                        outcome = "retried %s (HTTP %s), then delivered" % (
                            plural(len(failed), "time"), ", ".join(str(r["status"]) for r in failed))
                    else:
                        outcome = "delivered"
                    if len(ok_reqs) > 1:
                        outcome += " (%d times)" % len(ok_reqs)
                    ok = want == "delivered" and len(failed) == want_n
                    per_dest_times[(dname, order, topic)] = (got[0]["time"], ok_reqs[0]["time"])
                else:
                    outcome, ok = "NOT DELIVERED (%s seen)" % plural(len(got), "request"), False
            results.append(((order, topic, key), dname, outcome, ok))
            rows.append([order if first else "", topic if first else "", key if first else "",
                         dname, outcome + ("" if ok else "   ← unexpected")])
            first = False
    rows.append([ROLLED_BACK_ORDER, "order.placed", "order-%d" % ROLLED_BACK_ORDER, "(all)",
                 "rolled back: never delivered"])
    print("%sWhat happened to each message:%s" % (BOLD, RESET))
    table(["order", "topic", "key", "destination", "outcome"], rows)
    print()

    # --- the promises
    print("%sChecks:%s" % (BOLD, RESET))
    bad = [(m, d, o) for m, d, o, ok in results if not ok]
    check(not bad, "every committed message reached each subscribed destination as expected "
          "(%d message/destination pairs)" % len(results),
          "\n".join("order %s %s -> %s: %s" % (m[0], m[1], d, o) for m, d, o in bad))

    multi = {k: v for k, v in ids.items() if len(v) != 1}
    check(not multi, "each message kept one id (its Idempotency-Key) across destinations and retries",
          "\n".join("%s: %s" % (k, sorted(v)) for k, v in multi.items()))

    leaked = ([r["path"] for r in reqs if order_of(r["payload"]) == ROLLED_BACK_ORDER]
              + [n["raw"] for n in notes if order_of(n["payload"]) == ROLLED_BACK_ORDER]
              + [d["destination"] for d in dead if order_of(d["payload"]) == ROLLED_BACK_ORDER])
    queued = psql_json("SELECT destination, status FROM saga.queue WHERE payload->'order' = '%d'"
                       % ROLLED_BACK_ORDER)
    row = psql_json("SELECT id FROM orders WHERE id = %d" % ROLLED_BACK_ORDER)
    check(not leaked and not queued and not row,
          "the rolled-back order %d was never delivered, queued or stored" % ROLLED_BACK_ORDER,
          "delivered to: %s; queue rows: %s; order rows: %s" % (leaked, queued, row))

    # same key: at an HTTP destination the later message is first tried only
    # after the earlier one was delivered; NOTIFY deliveries arrive in order
    for key in sorted({k for _, _, k, c in STORY if c}):
        seq = [(o, t) for o, t, k, c in STORY if c and k == key]
        if len(seq) < 2:
            continue
        where, wrong = [], []
        for dname in sorted(dests):
            times = [per_dest_times.get((dname, o, t)) for o, t in seq]
            if any(x is None for x in times):
                continue
            if dests[dname]["kind"] == "notify":
                pos = [per_dest_pos[(dname, o, t)] for o, t in seq]
                in_order = pos == sorted(pos)
            else:
                in_order = all(times[i][1] <= times[i + 1][0] for i in range(len(times) - 1))
            where.append(dname)
            if not in_order:
                wrong.append("%s: first attempt / delivery times %s" % (dname, times))
        check(where and not wrong, "key %s kept publish order (%s) at %s" % (
            key, " → ".join(t for _, t in seq), ", ".join(where)), "\n".join(wrong))

    # deliver_at: no attempt before it
    delays, early = [], []
    for (dname, o, t), (first_t, _) in sorted(per_dest_times.items()):
        if t != DELAYED_TOPIC:
            continue
        payload = next((r["payload"] for r in reqs if r["topic"] == t and order_of(r["payload"]) == o),
                       next((n["payload"] for n in notes if n["topic"] == t and order_of(n["payload"]) == o), None))
        due_at = datetime.fromisoformat(payload["due_at"]).timestamp()
        delays.append("%s +%.2fs" % (dname, first_t - due_at))
        if first_t < due_at:
            early.append("%s: first attempt at %.3f, deliver_at %.3f" % (dname, first_t, due_at))
    check(delays and not early, "the delayed %s waited for its deliver_at (first attempt after it: %s)" % (
        DELAYED_TOPIC, ", ".join(delays)), "\n".join(early))

    check(not pending, "saga.outbox is empty", json.dumps(pending, indent=1))

    committed = [m for m in STORY if m[3]]
    want = {
        "messages_published_total": len(committed),
        "messages_delivered_total": sum(1 for m, d, o, ok in results if EXPECT.get(d, ("delivered",))[0] != "dead"),
        "messages_retried_total": sum(EXPECT[d][1] for m, d, o, ok in results if EXPECT.get(d, ("",))[0] == "delivered"),
        "messages_dead_lettered_total": sum(1 for m, d, o, ok in results if EXPECT.get(d, ("",))[0] == "dead"),
    }
    metrics = {m["name"]: m["value"] for m in psql_json("SELECT name, value FROM saga.metrics() WHERE labels = '{}'")}
    got = {k: metrics.get(k) for k in want}
    check(all(got[k] == want[k] for k in want),
          "saga.metrics() counts what happened: " + ", ".join(
              "%s %s" % (k.replace("messages_", "").replace("_total", ""), int(v) if v is not None else None)
              for k, v in got.items()),
          "expected %s" % want)
    return 0 if not failures else 1


def redeliver(requests_path, message_id, dname, expect, after):
    """After saga.redeliver(): one more attempt reached the destination, with the same id."""
    after = float(after)
    target = psql_json("SELECT target FROM saga.destinations WHERE name = '%s'" % dname.replace("'", "''"))
    path = urlsplit(target[0]["target"]).path if target else None
    reqs = [r for r in read_requests(requests_path)
            if r["id"] == message_id and r["path"] == path and r["time"] >= after]
    dead = psql_json("SELECT attempts, last_status, last_error FROM saga.dead_letters"
                     " WHERE message_id = '%s' AND destination = '%s'" % (message_id, dname))
    statuses = ", ".join("HTTP %d" % r["status"] for r in reqs) or "nothing"
    if expect == "dead":
        check(len(reqs) == 1 and reqs[0]["status"] >= 400 and len(dead) == 1,
              "%s got the message again (%s) with the same Idempotency-Key, and it is a dead letter again"
              % (dname, statuses), "requests: %s; dead letter: %s" % (statuses, dead))
    else:
        check(len(reqs) == 1 and 200 <= reqs[0]["status"] < 300 and not dead,
              "%s got the message again (%s) with the same Idempotency-Key, and it left the dead letters"
              % (dname, statuses), "requests: %s; dead letter: %s" % (statuses, dead))
    return 0 if not failures else 1


# ---------------------------------------------------------------- the sagas

STOCK = {"A-100": 5, "B-200": 4}    # what scripts/demo puts in shop.stock

# The orchestrated orders: order -> (saga, final saga status, effects in shop.effects)
SAGAS = {
    1: ("place_order", "completed", ["accept", "reserve", "confirm"]),
    2: ("place_order", "compensated", ["accept", "cancel"]),
    3: ("place_order_slow_delivery", "compensated", ["accept", "reserve", "release", "cancel"]),
}
FLAKY_PATH, HANG_PATH, CANCEL_PATH = "/flaky/1/deliveries", "/hang/deliveries", "/ok/deliveries/cancel"

# The choreography: order -> (qty, topics of its chain, effects, order status, delivery status)
CHAIN_OK = ["order.placed", "product.reserved", "delivery.scheduled"]
CHAIN_CANCEL = ["order.placed", "product.out_of_stock", "order.cancelled"]
CHOREOGRAPHY = {
    11: (3, CHAIN_OK, ["reserve", "schedule delivery", "confirm"], "confirmed", "scheduled"),
    12: (2, CHAIN_CANCEL, ["out of stock", "cancel", "cancel delivery"], "cancelled", "cancelled"),
    13: (1, CHAIN_OK, ["reserve", "schedule delivery", "confirm"], "confirmed", "scheduled"),
}
HANDLERS = {    # the service whose handler takes each topic
    "order.placed": "products", "product.reserved": "delivery", "delivery.scheduled": "orders",
    "product.out_of_stock": "orders", "order.cancelled": "delivery",
}


def ts(text):
    return datetime.fromisoformat(text).timestamp()


def short(value, width=70):
    text = json.dumps(value, separators=(", ", ": ")) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 1] + "…"


def describe_call(call):
    """A step's action or compensation, as the definition has it."""
    if call is None:
        return "nothing (no compensation)"
    if isinstance(call, dict) and "destination" in call:
        return "POST %s at %s" % (call.get("path", ""), call["destination"])
    if isinstance(call, dict):
        return call.get("function", json.dumps(call))
    return str(call)


def stock_checks(orders, skus):
    for sku in skus:
        qty = psql_json("SELECT qty FROM shop.stock WHERE sku = '%s'" % sku)[0]["qty"]
        taken = sum(o["qty"] for o in orders if o["sku"] == sku and o["status"] == "confirmed")
        check(qty >= 0 and qty == STOCK[sku] - taken,
              "stock of %s is %d: the %d in stock less the %d the confirmed orders took, never negative"
              % (sku, qty, STOCK[sku], taken),
              "expected %d" % (STOCK[sku] - taken))


def sagas(requests_path):
    reqs = [r for r in read_requests(requests_path) if r["id"] and ":" in r["id"]]
    rows = psql_json("""
        SELECT (s.input->>'order')::int AS "order", s.id, s.name, s.version, s.status,
               saga.get(s.id) AS get, d.steps AS definition
        FROM saga.sagas s JOIN saga.definitions d ON d.name = s.name AND d.version = s.version
        ORDER BY s.started_at""")
    orders = psql_json("SELECT id, sku, qty, status, delivery FROM shop.orders WHERE id < 10 ORDER BY id")
    effects = psql_json("SELECT order_id, effect, ref, at FROM shop.effects WHERE order_id < 10 ORDER BY at")
    order_by_id = {o["id"]: o for o in orders}
    t_first = min(ts(s["get"]["started_at"]) for s in rows) if rows else 0

    for s in rows:
        g, sid = s["get"], s["id"]
        o = order_by_id.get(s["order"], {})
        steps = {x["step"]: x for x in g.get("steps", [])}
        calls = {st["name"]: st for st in s["definition"]}
        t0 = ts(g["started_at"])
        print()
        print("%sOrder %s (%s × %s) — %s v%s: %s%s" % (BOLD, s["order"], o.get("qty"), o.get("sku"),
                                                       s["name"], s["version"], g["status"], RESET))
        print("  %ssaga %s, started %+.3fs after the first saga%s" % (DIM, sid, t0 - t_first, RESET))
        events = []
        for e in g.get("timeline", []):
            ev, name = e["event"], e.get("step")
            x = steps.get(name, {})
            n = x.get("attempts", 0)
            if ev == "started":
                text = "saga started, input %s" % short(g.get("input"))
            elif ev == "step done" and x.get("result") is None and x.get("error") \
                    and x.get("status") in ("compensated", "compensation_failed"):
                # no answer, and compensated all the same: the outcome was unknown
                text = "%-8s outcome UNKNOWN (%s): %s" % (name, plural(n, "attempt"), x.get("error"))
            elif ev == "step done":
                text = "%-8s done (%s) → %s" % (name, plural(n, "attempt"), short(x.get("result")))
            elif ev == "step failed":
                text = "%-8s FAILED (%s): %s" % (name, plural(n, "attempt"), x.get("error"))
            elif ev == "step outcome unknown":
                text = "%-8s outcome UNKNOWN (%s): %s" % (name, plural(n, "attempt"), x.get("error"))
            elif ev == "step compensated":
                comp = calls.get(name, {}).get("compensation")
                text = "%-8s compensated by %s (%s) → %s" % (
                    name, describe_call(comp), plural(x.get("compensation_attempts", 0) or 0, "attempt"),
                    short(x.get("compensation_result")))
            else:
                text = "saga %s%s" % (ev, (": " + g["error"]) if g.get("error") else "")
            events.append((ts(e["at"]), 1, text))
        for r in reqs:
            if not r["id"].startswith(sid + ":"):
                continue
            what = r["id"][len(sid) + 1:]
            answer = "HTTP %d" % r["status"] if r["status"] else "no answer (hangs)"
            events.append((r["time"], 0, "%-8s → POST %s  Idempotency-Key: %s  ← %s" % (
                "", r["path"], r["id"], answer)))
        for t, _, text in sorted(events, key=lambda e: (e[0], e[1])):
            print("  %s%+8.3fs%s  %s" % (DIM, t - t0, RESET, text))

    # --- the promises
    print()
    print("%sChecks:%s" % (BOLD, RESET))
    by_order = {s["order"]: s for s in rows}

    def reqs_of(sid, suffix, path=None):
        return [r for r in reqs if r["id"] == sid + suffix and (path is None or r["path"] == path)]

    for order, (name, want, want_effects) in sorted(SAGAS.items()):
        s = by_order.get(order)
        if not s:
            check(False, "order %d has a saga" % order)
            continue
        sid, g = s["id"], s["get"]
        steps = {x["step"]: x for x in g.get("steps", [])}
        got_effects = [e["effect"] for e in effects if e["order_id"] == order]
        check(s["name"] == name and g["status"] == want and got_effects == want_effects,
              "order %d: saga %s is %s; its effects: %s" % (order, name, g["status"], ", ".join(got_effects)),
              "expected %s %s with effects %s" % (name, want, want_effects))
    dup = {}
    for e in effects:
        dup.setdefault((e["ref"], e["effect"]), []).append(e)
    twice = [k for k, v in dup.items() if len(v) > 1]
    check(effects and not twice, "no step or compensation took effect twice (%s recorded)" % plural(len(effects), "effect"),
          "twice: %s" % twice)

    # order 1: delivery retried once, same key, one 2xx, confirm used the answer
    s1 = by_order.get(1)
    if s1:
        sid = s1["id"]
        deliver = reqs_of(sid, ":deliver")
        step = {x["step"]: x for x in s1["get"].get("steps", [])}.get("deliver", {})
        check([r["status"] for r in deliver] == [500, 200] and all(r["path"] == FLAKY_PATH for r in deliver)
              and step.get("attempts") == 2,
              "order 1: the delivery got HTTP 500, then 200 on the retry, both with Idempotency-Key %s:deliver"
              % sid, "requests: %s; step attempts %s" % (
                  [(r["path"], r["id"], r["status"]) for r in deliver], step.get("attempts")))
        delivery = (order_by_id.get(1) or {}).get("delivery") or {}
        check(delivery.get("key") == sid + ":deliver" and order_by_id[1]["status"] == "confirmed",
              "order 1: confirm kept the delivery service's answer on the order: %s" % short(delivery),
              "orders row: %s" % order_by_id.get(1))
        check(not reqs_of(sid, ":deliver:compensation"), "order 1: nothing was compensated")
    # order 2: nothing else changed
    s2 = by_order.get(2)
    if s2:
        sent = [r for r in reqs if r["id"].startswith(s2["id"] + ":")]
        step = {x["step"]: x for x in s2["get"].get("steps", [])}
        check(step.get("reserve", {}).get("status") == "failed" and "deliver" not in step and not sent
              and order_by_id.get(2, {}).get("status") == "cancelled",
              "order 2: the reservation failed, the order was cancelled, the delivery service heard nothing",
              "steps %s; requests %s; order %s" % (
                  {k: v.get("status") for k, v in step.items()}, [r["path"] for r in sent], order_by_id.get(2)))
    # order 3: two attempts with one key, unknown, compensated once, after the last attempt
    s3 = by_order.get(3)
    if s3:
        sid = s3["id"]
        attempts = reqs_of(sid, ":deliver")
        comps = reqs_of(sid, ":deliver:compensation")
        step = {x["step"]: x for x in s3["get"].get("steps", [])}.get("deliver", {})
        check(len(attempts) == 2 and all(r["path"] == HANG_PATH and r["status"] == 0 for r in attempts)
              and step.get("attempts") == 2,
              "order 3: the delivery was tried twice with Idempotency-Key %s:deliver, and never answered" % sid,
              "requests: %s; step attempts %s" % ([(r["path"], r["id"], r["status"]) for r in attempts],
                                                  step.get("attempts")))
        check(len(comps) == 1 and comps[0]["path"] == CANCEL_PATH and comps[0]["status"] == 200
              and attempts and comps[0]["time"] > attempts[-1]["time"] and step.get("status") == "compensated",
              "order 3: its unknown outcome was compensated: one POST %s with Idempotency-Key "
              "%s:deliver:compensation, after the last attempt" % (CANCEL_PATH, sid),
              "compensation requests: %s; deliver step status %s" % (
                  [(r["path"], r["id"], r["status"]) for r in comps], step.get("status")))
    keys = {}
    for r in reqs:
        keys.setdefault((r["id"], r["path"]), []).append(r)
    twice = [k for k, v in keys.items() if sum(1 for r in v if 200 <= r["status"] < 300) > 1]
    check(not twice, "the delivery service answered 2xx at most once per Idempotency-Key", "twice: %s" % twice)
    stock_checks(orders, ["A-100"])
    return 0 if not failures else 1


def choreography(t0):
    t0 = float(t0)
    inbox = psql_json("""
        SELECT message_id, topic, key, status, attempts, last_error,
               extract(epoch FROM received_at) AS received, extract(epoch FROM processed_at) AS processed
        FROM saga.inbox ORDER BY key, message_id""")
    effects = psql_json("SELECT order_id, effect, ref FROM shop.effects WHERE order_id > 10 ORDER BY at")
    orders = psql_json("""SELECT o.id, o.sku, o.qty, o.status, d.status AS delivery
                          FROM shop.orders o LEFT JOIN shop.deliveries d ON d.order_id = o.id
                          WHERE o.id > 10 ORDER BY o.id""")
    by_ref = {}
    for e in effects:
        by_ref.setdefault(e["ref"], []).append(e)

    print("%sThe chain of each order%s (when each message was handled, since the first commit):" % (BOLD, RESET))
    for o in orders:
        print("  %sorder %d (%d × %s): %s%s" % (BOLD, o["id"], o["qty"], o["sku"], o["status"], RESET))
        for m in inbox:
            if m["key"] != "order-%d" % o["id"]:
                continue
            done = by_ref.get(m["message_id"], [])
            did = ", ".join(e["effect"] for e in done) or "nothing"
            when = "+%.3fs" % (m["processed"] - t0) if m["processed"] else "pending"
            print("    %s%8s%s  %-20s → %-10s %s" % (DIM, when, RESET, m["topic"],
                                                  HANDLERS.get(m["topic"], "?") + ":", did))
    print()
    print("%sChecks:%s" % (BOLD, RESET))
    pending = [m for m in inbox if m["status"] != "processed" or m["attempts"] != 1]
    check(inbox and not pending, "every message of the chains was processed, at the first attempt (%s)"
          % plural(len(inbox), "message"), json.dumps(pending, indent=1))
    twice = {k: [e["effect"] for e in v] for k, v in by_ref.items() if len(v) != 1}
    unhandled = [m["message_id"] for m in inbox if m["message_id"] not in by_ref]
    check(not twice and not unhandled,
          "each message was handled exactly once: one effect per message, none twice",
          "messages with several effects: %s; without: %s" % (twice, unhandled))
    by_id = {o["id"]: o for o in orders}
    for oid, (qty, chain, want_effects, status, delivery) in sorted(CHOREOGRAPHY.items()):
        o = by_id.get(oid, {})
        topics = [m["topic"] for m in inbox if m["key"] == "order-%d" % oid]
        got = [e["effect"] for e in effects if e["order_id"] == oid]
        check(topics == chain and got == want_effects and o.get("status") == status and o.get("delivery") == delivery,
              "order %d: %s; order %s, delivery %s" % (oid, " → ".join(topics), o.get("status"), o.get("delivery")),
              "expected %s with effects %s, order %s, delivery %s; effects were %s"
              % (" → ".join(chain), want_effects, status, delivery, got))
    stock_checks(orders, ["B-200"])
    return 0 if not failures else 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit({"story": story, "redeliver": redeliver, "sagas": sagas,
              "choreography": choreography}[cmd](*args))

#!/usr/bin/env python3
"""The demo's report: each order's timeline across the three service
databases, the state each database ended in, and checks of the scenario's
promises (exit status 1 if one was broken).

    report.py DOWN_AT UP_AT

DOWN_AT and UP_AT are the Unix times at which the delivery cluster was
stopped and started again. psql reaches the clusters through PGHOST and
PGUSER, and the ports in PORT_ORDERS, PORT_PRODUCTS and PORT_DELIVERY; each
service's database is named after it.

Sources: in orders, saga.get(id) for each saga, the orders table, its effects
and saga.inbox; in products and delivery, their business tables, their
effects, saga.inbox and saga.invocations (what saga.invoke and
saga.compensate recorded); in all three, saga.outbox, saga.dead_letters and
saga.stuck. Every business function appends (order, effect, ref) to its
database's effects table, ref being "<saga id>:<step>" for a saga step and
the message id for an inbox handler: that is what the checks count.
"""
import json
import os
import subprocess
import sys
from datetime import datetime

SERVICES = ["orders", "products", "delivery"]
STOCK = {"A-100": 5, "B-200": 4}

# What scripts/demo does, and what must come of it. For each order: how it
# was placed, and per database its final state and the effects made for it,
# in time order. products' state is the reservation's status, delivery's the
# delivery's status (None: no row).
SAGA_OK = {"orders": ["accepted", "confirmed"], "products": ["reserved"], "delivery": ["scheduled"]}
ORDERS = {
    1: dict(flow="saga", saga="completed", state=("confirmed", "reserved", "scheduled"), effects=SAGA_OK),
    2: dict(flow="saga", saga="compensated", state=("cancelled", None, None),
            effects={"orders": ["accepted", "cancelled"], "products": [], "delivery": []}),
    3: dict(flow="saga", saga="compensated", state=("cancelled", "released", None),
            effects={"orders": ["accepted", "cancelled"], "products": ["reserved", "released"], "delivery": []}),
    4: dict(flow="rolled back", saga=None, state=(None, None, None),
            effects={"orders": [], "products": [], "delivery": []}),
    5: dict(flow="saga", saga="completed", down=True, state=("confirmed", "reserved", "scheduled"), effects=SAGA_OK),
    6: dict(flow="saga", saga="completed", down=True, state=("confirmed", "reserved", "scheduled"), effects=SAGA_OK),
    11: dict(flow="events", state=("confirmed", "reserved", "scheduled"),
             effects={"orders": ["confirmed"], "products": ["reserved"], "delivery": ["scheduled"]},
             chain=[("products", "OrderPlaced", "orders"), ("delivery", "StockReserved", "products"),
                    ("orders", "DeliveryScheduled", "delivery")]),
    12: dict(flow="events", state=("cancelled", None, "cancelled"),
             effects={"orders": ["cancelled", "delivery cancelled"], "products": ["out of stock"],
                      "delivery": ["cancelled"]},
             chain=[("products", "OrderPlaced", "orders"), ("orders", "ProductOutOfStock", "products"),
                    ("delivery", "OrderCancelled", "orders"), ("orders", "DeliveryCancelled", "delivery")]),
}
# saga steps that run in another database: step -> database
REMOTE_STEPS = {"reserve": "products", "schedule": "delivery"}
# saga.invocations in products / delivery, per order: status of "<saga>:<step>"
INVOCATIONS = {
    1: {"products": "executed", "delivery": "executed"},
    2: {},
    3: {"products": "compensated"},
    5: {"products": "executed", "delivery": "executed"},
    6: {"products": "executed", "delivery": "executed"},
}

TTY = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
GREEN, RED, DIM, BOLD, YELLOW, RESET = (
    ("\033[32m", "\033[31m", "\033[2m", "\033[1m", "\033[33m", "\033[0m") if TTY else ("",) * 6)

failures = []


def check(ok, text, detail=""):
    if ok:
        print("  %s✓%s %s" % (GREEN, RESET, text))
    else:
        failures.append(text)
        print("  %s✗ %s%s" % (RED, text, RESET))
        for line in (detail or "").splitlines():
            print("      " + line)


def q(service, sql):
    """Rows of a query in a service's database, as a list of dicts."""
    port = os.environ["PORT_" + service.upper()]
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-p", port, "-d", service,
         "-c", "SELECT coalesce(json_agg(r), '[]') FROM (%s) r" % sql],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def ts(text):
    return datetime.fromisoformat(text).timestamp()


def uuid7_time(uuid):
    """The Unix time (ms precision) at which a message id was made."""
    return int(uuid.replace("-", "")[:12], 16) / 1000.0


def short(value, width=64):
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= width else text[:width - 1] + "…"


def plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    print(BOLD + line(headers) + RESET)
    print("  " + "  ".join("─" * w for w in widths))
    for r in rows:
        print(line(r))


def main(down_at, up_at):
    down_at, up_at = float(down_at), float(up_at)

    # --- read the three databases
    orders = {o["id"]: o for o in q("orders", "SELECT id, sku, qty, city, status, delivery FROM orders.orders")}
    reservations = {r["order_id"]: r for r in q("products", "SELECT * FROM products.reservations")}
    deliveries = {d["order_id"]: d for d in q("delivery", "SELECT * FROM delivery.deliveries")}
    stock = {s["sku"]: s["qty"] for s in q("products", "SELECT sku, qty FROM products.stock")}
    effects = {s: q(s, "SELECT order_id, effect, ref, extract(epoch FROM at)::float8 AS at "
                       "FROM %s.effects ORDER BY at" % s) for s in SERVICES}
    inbox = {s: q(s, "SELECT message_id, topic, key, source, status, attempts, last_error,"
                     " extract(epoch FROM received_at)::float8 AS received,"
                     " extract(epoch FROM processed_at)::float8 AS processed"
                     " FROM saga.inbox ORDER BY received_at") for s in SERVICES}
    invocations = {s: {i["key"]: i for i in q(s, """
        SELECT key, status, fn, compensation_fn, invoked_by::text AS invoked_by,
               compensated_by::text AS compensated_by,
               extract(epoch FROM invoked_at)::float8 AS invoked_at,
               extract(epoch FROM compensated_at)::float8 AS compensated_at
        FROM saga.invocations""")} for s in ("products", "delivery")}
    leftovers = {s: {
        "outbox": q(s, "SELECT message_id, topic, key, destination, status, attempts, last_error FROM saga.outbox"),
        "dead letters": q(s, "SELECT message_id, topic, key, destination, attempts, last_error FROM saga.dead_letters"),
        "inbox not processed": q(s, "SELECT message_id, topic, key, status, attempts, last_error "
                                    "FROM saga.inbox WHERE status <> 'processed'"),
        "stuck sagas": q(s, "SELECT id, name, status, reason FROM saga.stuck"),
    } for s in SERVICES}
    sagas = {s["order"]: s for s in q("orders", """
        SELECT (s.input->>'order')::int AS "order", s.id, s.name, s.idempotency_key,
               saga.get(s.id) AS get
        FROM saga.sagas s ORDER BY s.started_at""")}

    def effects_of(service, order):
        return [e for e in effects[service] if e["order_id"] == order]

    def state_of(order):
        o, r, d = orders.get(order), reservations.get(order), deliveries.get(order)
        return (o and o["status"], r and r["status"], d and d["status"])

    def describe_state(order):
        o, r, d = orders.get(order), reservations.get(order), deliveries.get(order)
        return ["order %s" % o["status"] if o else "no order",
                "%s %d × %s" % (r["status"], r["qty"], r["sku"]) if r else "no reservation",
                ("delivery %s" % d["status"] + (" (%s, %s)" % (d["city"], d["day"]) if d["day"] else ""))
                if d else "no delivery"]

    def remote_line(service, e, sid):
        step = e["ref"][len(sid) + 1:]
        inv = invocations[service].get(e["ref"], {})
        if e["effect"] in ("released", "cancelled") and inv.get("compensation_fn"):
            how = "saga.compensate(%s) as %s" % (inv["compensation_fn"], inv.get("compensated_by"))
        else:
            how = "saga.invoke(%s) as %s" % (inv.get("fn", "?"), inv.get("invoked_by", "?"))
        return "%-9s %-8s %s, by %s" % (service, step, e["effect"], how)

    # --- the timelines
    print("%sTimelines%s (seconds since the order was placed; one clock, three databases)" % (BOLD, RESET))
    for order, want in ORDERS.items():
        o = orders.get(order)
        print()
        head = "Order %d" % order
        if o:
            head += " — %d × %s to %s" % (o["qty"], o["sku"], o["city"])
        if want["flow"] == "saga" and order in sagas:
            g = sagas[order]["get"]
            head += " — saga %s: %s" % (g["name"], g["status"])
        elif want["flow"] == "events":
            head += " — events: order %s" % (o["status"] if o else "missing")
        else:
            head += " — rolled back"
        print("%s%s%s" % (BOLD, head, RESET))
        events = []
        if want["flow"] == "saga" and order in sagas:
            s = sagas[order]
            g, sid = s["get"], s["id"]
            steps = {x["step"]: x for x in g.get("steps", [])}
            t0 = ts(g["started_at"])
            print("  %ssaga %s%s" % (DIM, sid, RESET))
            for e in g.get("timeline", []):
                ev, name = e["event"], e.get("step")
                x = steps.get(name, {})
                n = x.get("attempts", 0)
                if ev == "started":
                    text = "saga started, input %s" % short(g.get("input"))
                elif ev == "step done":
                    text = "%-8s done (%s) → %s" % (name, plural(n, "attempt"), short(x.get("result"), 48))
                elif ev == "step failed":
                    text = "%-8s FAILED (%s): %s" % (name, plural(n, "attempt"), x.get("error"))
                elif ev == "step outcome unknown":
                    text = "%-8s outcome UNKNOWN (%s): %s" % (name, plural(n, "attempt"), x.get("error"))
                elif ev == "step compensated":
                    text = "%-8s compensated → %s" % (name, short(x.get("compensation_result"), 48))
                else:
                    text = "saga %s" % ev
                events.append((ts(e["at"]), 1, "%-9s %s" % ("orders", text)))
            for svc in ("products", "delivery"):
                for e in effects_of(svc, order):
                    events.append((e["at"], 0, remote_line(svc, e, sid)))
            if want.get("down"):
                events.append((down_at, 0, "%s%-9s DOWN: pg_ctl stop -m immediate%s" % (YELLOW, "delivery", RESET)))
                events.append((up_at, 0, "%s%-9s back up%s" % (YELLOW, "delivery", RESET)))
        elif want["flow"] == "events":
            msgs = sorted(((svc, m) for svc in SERVICES for m in inbox[svc] if m["key"] == "order-%d" % order),
                          key=lambda sm: sm[1]["received"])
            t0 = uuid7_time(msgs[0][1]["message_id"]) if msgs else 0
            if msgs:
                events.append((t0, 0, "%-9s order inserted and %s published, one transaction"
                               % ("orders", msgs[0][1]["topic"])))
            for svc, m in msgs:
                did = [e["effect"] for e in effects[svc] if e["ref"] == m["message_id"]]
                events.append((m["processed"] or m["received"], 1,
                               "%-9s handled %-17s from %-8s → %-18s %s(sent %+.3fs, received %+.3fs, %s)%s"
                               % (svc, m["topic"], m["source"], ", ".join(did) or "nothing", DIM,
                                  uuid7_time(m["message_id"]) - t0, m["received"] - t0,
                                  plural(m["attempts"], "attempt"), RESET)))
        else:
            t0 = 0
            print("  the application rolled back: the order row and saga.start went together")
        for t, _, text in sorted(events, key=lambda e: (e[0], e[1])):
            print("  %s%+8.3fs%s  %s" % (DIM, t - t0, RESET, text))
        print("  %s%s%s" % (DIM, "now: " + " · ".join(describe_state(order)), RESET))

    # --- the final state, side by side
    print()
    print("%sWhere each order ended, in each database:%s" % (BOLD, RESET))
    rows = []
    for order, want in ORDERS.items():
        st = [x or "—" for x in state_of(order)]
        got_saga = sagas[order]["get"]["status"] if order in sagas else "—"
        r = reservations.get(order)
        rows.append([order, want["flow"], got_saga if want["flow"] == "saga" else "—",
                     st[0], "%s %d × %s" % (st[1], r["qty"], r["sku"]) if r else st[1], st[2]])
    table(["order", "flow", "saga", "orders", "products", "delivery"], rows)
    print("  stock now: %s" % ", ".join("%s %d" % (k, v) for k, v in sorted(stock.items())))

    # --- the promises
    print()
    print("%sChecks:%s" % (BOLD, RESET))
    bad = []
    for order, want in ORDERS.items():
        got = state_of(order)
        got_saga = sagas[order]["get"]["status"] if order in sagas else None
        if got != want["state"] or got_saga != want.get("saga"):
            bad.append("order %d: saga %s, state (orders, products, delivery) %s; expected saga %s, %s"
                       % (order, got_saga, got, want.get("saga"), want["state"]))
    check(not bad, "every order ended in the right state in orders, products and delivery "
          "(sagas 1, 5, 6 completed; 2, 3 compensated; 4 never existed)", "\n".join(bad))

    # stock: never negative (a validated CHECK) and what the confirmed orders took
    guarded = q("products", "SELECT count(*) AS n FROM pg_constraint WHERE conrelid = 'products.stock'::regclass"
                            " AND contype = 'c' AND convalidated AND pg_get_constraintdef(oid) = 'CHECK ((qty >= 0))'")
    taken = {}
    for order, o in orders.items():
        if o["status"] == "confirmed":
            taken[o["sku"]] = taken.get(o["sku"], 0) + o["qty"]
    wrong = {k: (stock.get(k), STOCK[k] - taken.get(k, 0)) for k in STOCK
             if stock.get(k) is None or stock[k] < 0 or stock[k] != STOCK[k] - taken.get(k, 0)}
    check(not wrong and guarded[0]["n"] == 1, "stock never negative (CHECK qty >= 0) and equal to the initial stock less the "
          "confirmed orders: %s" % ", ".join("%s %d − %d = %d" % (k, STOCK[k], taken.get(k, 0), stock.get(k, -1))
                                            for k in sorted(STOCK)),
          "sku: (now, expected) %s; CHECK (qty >= 0) constraints on products.stock: %d"
          % (wrong, guarded[0]["n"]))

    # every effect exactly once: per order and database, the expected list;
    # and no (ref, effect) recorded twice anywhere
    bad = []
    total = 0
    for order, want in ORDERS.items():
        for svc in SERVICES:
            got = [e["effect"] for e in effects_of(svc, order)]
            total += len(got)
            if got != want["effects"][svc]:
                bad.append("order %d in %s: %s, expected %s" % (order, svc, got or "nothing", want["effects"][svc] or "nothing"))
    known = set(ORDERS)
    for svc in SERVICES:
        seen = {}
        for e in effects[svc]:
            seen.setdefault((e["ref"], e["effect"]), []).append(e)
            if e["order_id"] not in known:
                bad.append("%s: an effect for unknown order %s" % (svc, e["order_id"]))
        bad += ["%s: %s by %s recorded %d times" % (svc, k[1], k[0], len(v)) for k, v in seen.items() if len(v) > 1]
    check(not bad, "every effect happened exactly once: %d effects across the three databases, "
          "each expected one present, none twice" % total, "\n".join(bad))

    # remote saga steps: one saga.invocations row per key, in the right state
    bad = []
    n = 0
    for order, want in sorted(INVOCATIONS.items()):
        sid = sagas[order]["id"] if order in sagas else None
        for step, svc in REMOTE_STEPS.items():
            key = "%s:%s" % (sid, step)
            inv = invocations[svc].get(key)
            expect = want.get(svc)
            if (inv and inv["status"]) != expect:
                bad.append("order %d, %s in %s: %s, expected %s" % (order, step, svc, inv and inv["status"], expect))
            n += bool(inv)
    sids = {s["id"] for s in sagas.values()}
    for svc in ("products", "delivery"):
        for key, inv in invocations[svc].items():
            if key.rsplit(":", 1)[0] not in sids or inv["status"] == "tombstone":
                bad.append("%s: unexpected invocation %s (%s)" % (svc, key, inv["status"]))
            if inv["invoked_by"] not in (None, "orders_service"):
                bad.append("%s: %s ran as %s, not orders_service" % (svc, key, inv["invoked_by"]))
    check(not bad, "remote saga steps ran once per key, as orders_service: %d saga.invocations rows in "
          "products and delivery, compensated only where the saga undid them" % n, "\n".join(bad))

    # messages: each chain as designed, each message handled once
    bad = []
    n = 0
    for order, want in ORDERS.items():
        if "chain" not in want:
            continue
        msgs = sorted(((svc, m) for svc in SERVICES for m in inbox[svc] if m["key"] == "order-%d" % order),
                      key=lambda sm: sm[1]["received"])
        got = [(svc, m["topic"], m["source"]) for svc, m in msgs]
        if got != want["chain"]:
            bad.append("order %d: %s, expected %s" % (order, got, want["chain"]))
    for svc in SERVICES:
        for m in inbox[svc]:
            n += 1
            did = [e for e in effects[svc] if e["ref"] == m["message_id"]]
            if m["status"] != "processed" or m["attempts"] != 1 or len(did) != 1:
                bad.append("%s: %s %s is %s after %s, with %d effects (%s)" % (
                    svc, m["topic"], m["key"], m["status"], plural(m["attempts"], "attempt"), len(did),
                    m["last_error"] or "no error"))
    check(not bad and n == sum(len(w.get("chain", [])) for w in ORDERS.values()),
          "each message was handled exactly once: %d messages in the three inboxes, each processed "
          "at its first attempt with one effect, in the order the design says" % n, "\n".join(bad))

    # delivery down: sagas 5 and 6 retried and completed after it came back
    bad = []
    tries = []
    for order, want in ORDERS.items():
        if not want.get("down"):
            continue
        g = sagas.get(order, {}).get("get", {})
        step = {x["step"]: x for x in g.get("steps", [])}.get("schedule", {})
        tries.append("%d: %s" % (order, plural(step.get("attempts", 0), "attempt")))
        done = [e for e in effects_of("delivery", order) if e["effect"] == "scheduled"]
        if not (g.get("status") == "completed" and step.get("attempts", 0) > 1
                and done and done[0]["at"] >= up_at and ts(g["finished_at"]) >= up_at):
            bad.append("order %d: saga %s, schedule %s after %s, delivery effects %s" % (
                order, g.get("status"), step.get("status"), plural(step.get("attempts", 0), "attempt"),
                [(e["effect"], round(e["at"] - up_at, 3)) for e in done]))
    check(not bad, "while delivery was down, orders 5 and 6 waited and retried (schedule: %s), and "
          "completed once it was back" % ", ".join(tries), "\n".join(bad))

    # nothing left behind
    bad = []
    for svc in SERVICES:
        for what, rows in leftovers[svc].items():
            for r in rows:
                bad.append("%s, %s: %s" % (svc, what, json.dumps(r)))
    check(not bad, "nothing left behind: saga.outbox empty, no dead letters, no inbox message pending or "
          "dead, saga.stuck empty, in all three databases", "\n".join(bad))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

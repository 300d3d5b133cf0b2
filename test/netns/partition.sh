#!/usr/bin/env bash
# Network partition between two service databases. "orders" runs in network
# namespace A, "products" in namespace B, joined by a veth pair whose
# addresses exist only inside those two namespaces. orders delivers messages
# into products' inbox and runs saga steps there through a postgresql://
# destination. The link is cut for about ten seconds while messages are
# published and sagas started, then restored: every message is handled once,
# every saga completes with its remote effect once, nothing is dead-lettered,
# and the worker kept working (local sagas finished during the cut).
#
# Needs root (namespaces) and runs the servers as postgres. TAP output.
set -uo pipefail

skip() { echo "1..0 # SKIP $*"; exit 0; }
[[ $(id -u) -eq 0 ]] || skip "network namespaces need root"
command -v ip >/dev/null || skip "ip (iproute2) is not installed"
BIN=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
PGUSER_OS=${SAGA_TEST_USER:-postgres}

NS_A=saga-a-$$
NS_B=saga-b-$$
VETH_A=sga$$
VETH_B=sgb$$
ADDR_A=10.231.$(($$ % 250)).1
ADDR_B=10.231.$(($$ % 250)).2
TMP=$(mktemp -d /tmp/saga-netns.XXXXXX)

cleanup() {
    for c in orders products; do
        [[ -f $TMP/$c/postmaster.pid ]] &&
            runuser -u "$PGUSER_OS" -- "$BIN/pg_ctl" -D "$TMP/$c" -m immediate stop >/dev/null 2>&1
    done
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    ip link del "$VETH_A" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

ip netns add "$NS_A" 2>/dev/null || skip "cannot create network namespaces here"
ip netns add "$NS_B" || skip "cannot create network namespaces here"
ip link add "$VETH_A" type veth peer name "$VETH_B" || skip "cannot create a veth pair here"
ip link set "$VETH_A" netns "$NS_A"
ip link set "$VETH_B" netns "$NS_B"
ip -n "$NS_A" addr add "$ADDR_A/24" dev "$VETH_A"
ip -n "$NS_B" addr add "$ADDR_B/24" dev "$VETH_B"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up

n=0
failed=0
ok() {
    n=$((n + 1))
    if [[ $1 == 0 ]]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi
}
# is GOT EXPECTED NAME
is() {
    if [[ $1 == "$2" ]]; then ok 0 "$3"; else ok 1 "$3"; echo "#   got: '$1'"; echo "#   expected: '$2'"; fi
}

chown "$PGUSER_OS" "$TMP"
start_cluster() {			# NAME PORT NS LISTEN
    local dir=$TMP/$1
    runuser -u "$PGUSER_OS" -- "$BIN/initdb" -D "$dir" -A trust >/dev/null || return 1
    mkdir -p "$TMP/sock-$1" && chown "$PGUSER_OS" "$TMP/sock-$1"
    cat >>"$dir/postgresql.conf" <<EOF
port = $2
listen_addresses = '$4'
unix_socket_directories = '$TMP/sock-$1'
shared_preload_libraries = 'saga'
saga.poll_interval = 200ms
max_connections = 30
EOF
    echo "host all all ${ADDR_A%.*}.0/24 trust" >>"$dir/pg_hba.conf"
    ip netns exec "$3" runuser -u "$PGUSER_OS" -- "$BIN/pg_ctl" -D "$dir" -l "$TMP/$1.log" -w start >/dev/null
}
sql() {				# NAME SQL
    local port=5441
    [[ $1 == products ]] && port=5442
    runuser -u "$PGUSER_OS" -- "$BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$TMP/sock-$1" -p $port -d postgres -c "$2"
}
# wait_for NAME SQL SECONDS: until SQL returns t
wait_for() {
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        [[ $(sql "$1" "$2" 2>/dev/null) == t ]] && return 0
        sleep 0.2
    done
    return 1
}

start_cluster orders 5441 "$NS_A" '' || { echo "Bail out! orders cluster did not start"; exit 1; }
start_cluster products 5442 "$NS_B" "$ADDR_B" || { echo "Bail out! products cluster did not start"; exit 1; }
echo "1..12"

sql products "
CREATE EXTENSION saga;
CREATE ROLE svc LOGIN;
GRANT EXECUTE ON FUNCTION saga.receive(uuid, text, jsonb, text, jsonb, text) TO svc;
CREATE SCHEMA shop;
GRANT USAGE ON SCHEMA shop TO svc;
CREATE TABLE shop.got (id uuid, payload jsonb);
CREATE FUNCTION shop.on_order(m jsonb) RETURNS void LANGUAGE sql
    AS \$\$ INSERT INTO shop.got VALUES ((m ->> 'id')::uuid, m -> 'payload') \$\$;
SELECT saga.handle('order.*', 'shop.on_order(jsonb)');
CREATE TABLE shop.effects (saga_id uuid);
GRANT INSERT ON shop.effects TO svc;
CREATE FUNCTION shop.reserve(ctx jsonb) RETURNS jsonb LANGUAGE sql
    AS \$\$ INSERT INTO shop.effects VALUES ((ctx ->> 'saga_id')::uuid) RETURNING '{\"reserved\": true}'::jsonb \$\$;
GRANT EXECUTE ON FUNCTION shop.reserve(jsonb) TO svc;" >/dev/null || { echo "Bail out! products set-up failed"; exit 1; }

sql orders "
CREATE EXTENSION saga;
CREATE SCHEMA app;
CREATE FUNCTION app.noop(ctx jsonb) RETURNS jsonb LANGUAGE sql AS \$\$ SELECT '{}'::jsonb \$\$;
SELECT saga.create_destination('products', 'postgresql://svc@$ADDR_B:5442/postgres',
    '{\"timeout\": \"2s\", \"backoff\": \"200ms\", \"max_backoff\": \"2s\", \"max_attempts\": 100}');
SELECT saga.subscribe('order.*', 'products');
SELECT saga.define('remote', '{\"steps\": [{\"name\": \"reserve\",
    \"action\": {\"destination\": \"products\", \"function\": \"shop.reserve\"},
    \"backoff\": \"200ms\", \"max_attempts\": 100}], \"deadline\": \"10 min\"}');
SELECT saga.define('local', '{\"steps\": [{\"name\": \"a\", \"action\": \"app.noop\"}]}');" >/dev/null ||
    { echo "Bail out! orders set-up failed"; exit 1; }

publish() { sql orders "SELECT count(saga.publish('order.placed', jsonb_build_object('n', g), 'k' || (g % 10))) FROM generate_series(1, $1) g" >/dev/null; }
start_sagas() { sql orders "SELECT count(saga.start('$1', jsonb_build_object('n', g))) FROM generate_series(1, $2) g" >/dev/null; }

publish 200
start_sagas remote 10
wait_for orders "SELECT NOT EXISTS (SELECT FROM saga.outbox) AND NOT EXISTS (SELECT FROM saga.sagas WHERE status <> 'completed')" 60
ok $? "before the cut: 200 messages delivered and 10 remote sagas completed"

# cut the link while publishing and starting sagas
ip -n "$NS_A" link set "$VETH_A" down
ip -n "$NS_B" link set "$VETH_B" down
for _ in 1 2 3; do publish 100; start_sagas remote 5; sleep 1; done
wait_for orders "SELECT count(*) > 0 FROM saga.outbox WHERE attempts > 0 AND last_error ~ 'connect|no answer|unreachable'" 20
ok $? "during the cut: deliveries are retried with a connection error"
start_sagas local 20
wait_for orders "SELECT count(*) = 20 FROM saga.sagas WHERE name = 'local' AND status = 'completed'" 20
ok $? "during the cut: local sagas started meanwhile complete (the worker is not stuck)"
is "$(sql orders "SELECT count(*) FROM saga.sagas WHERE name = 'remote' AND status = 'running'")" 15 \
    "during the cut: the 15 remote sagas started meanwhile wait, running"
is "$(sql orders "SELECT count(*) FROM saga.dead_letters")" 0 "during the cut: nothing is dead-lettered"
sleep 5

# restore it
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up
wait_for orders "SELECT NOT EXISTS (SELECT FROM saga.outbox) AND NOT EXISTS (SELECT FROM saga.sagas WHERE status <> 'completed')" 90
ok $? "after the link is back: the outbox empties and every saga completes"
is "$(sql products "SELECT count(*) || ' ' || count(DISTINCT id) FROM shop.got")" "500 500" \
    "every one of the 500 messages was handled exactly once"
is "$(sql products "SELECT count(*) FROM saga.inbox WHERE source = 'postgres' AND status = 'processed'")" 500 \
    "products' inbox holds the 500 messages, processed, from orders"
is "$(sql products "SELECT count(*) || ' ' || count(DISTINCT saga_id) FROM shop.effects")" "25 25" \
    "every remote saga step took effect exactly once (25 sagas)"
is "$(sql orders "SELECT count(*) FROM saga.dead_letters")" 0 "no dead letters"
is "$(sql orders "SELECT count(*) FROM saga.sagas WHERE status <> 'completed'")" 0 "no saga left behind"
is "$(sql orders "SELECT state FROM saga.worker_status() WHERE kind = 'worker'")" idle \
    "the worker is alive and idle afterwards"
exit $failed

-- saga 0.1: destinations, the transactional outbox, NOTIFY and HTTP delivery

\echo Use "CREATE EXTENSION saga" to load this file. \quit

CREATE SCHEMA saga;
COMMENT ON SCHEMA saga IS 'sagas and a transactional outbox';

-- Where the worker may send things. Declared by administrators only: the
-- worker never connects anywhere that is not in this table.
CREATE TABLE saga.destinations (
    name text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('notify', 'http')),
    target text NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}',
    timeout interval NOT NULL,
    max_attempts integer NOT NULL,
    backoff interval NOT NULL,
    max_backoff interval NOT NULL,
    concurrency integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE saga.destinations IS 'where the worker may deliver: NOTIFY channels and HTTP endpoints (headers may hold secrets)';

CREATE TABLE saga.subscriptions (
    pattern text NOT NULL,
    destination text NOT NULL REFERENCES saga.destinations (name),
    prefix text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, destination)
);
COMMENT ON TABLE saga.subscriptions IS 'which topics go to which destination; pattern "x.*" has prefix "x."';

-- Backends cache the subscriptions for publish; any change makes them reread.
CREATE FUNCTION saga.subscriptions_changed()
RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'saga_subscriptions_changed';
COMMENT ON FUNCTION saga.subscriptions_changed() IS 'internal: tells backends to reread saga.subscriptions after commit';
CREATE TRIGGER subscriptions_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON saga.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION saga.subscriptions_changed();

-- One row per message and destination. Delivered rows are deleted at once,
-- so the table holds only what is pending, dead-lettered, or kept for
-- saga.message() after a NOTIFY that could not carry the payload.
CREATE SEQUENCE saga.queue_seq;
CREATE TABLE saga.queue (
    message_id uuid NOT NULL,
    destination text NOT NULL,
    seq bigint NOT NULL DEFAULT nextval('saga.queue_seq'),
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb,
    published_at timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL,
    lease_until timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'dead', 'delivered')),
    last_error text,
    last_status integer,
    finished_at timestamptz,
    PRIMARY KEY (message_id, destination)
) WITH (fillfactor = 90,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0.01,
        autovacuum_vacuum_cost_delay = 0);
CREATE INDEX queue_due ON saga.queue (destination, next_attempt_at, seq) WHERE status = 'pending';
CREATE INDEX queue_pending_key ON saga.queue (destination, key, seq) WHERE status = 'pending' AND key IS NOT NULL;
CREATE INDEX queue_retained ON saga.queue (finished_at) WHERE status = 'delivered';
COMMENT ON TABLE saga.queue IS 'messages not yet delivered, one row per destination (internal; read saga.outbox and saga.dead_letters)';

-- pg_dump keeps what users declared and what is still to be delivered
SELECT pg_catalog.pg_extension_config_dump('saga.destinations', '');
SELECT pg_catalog.pg_extension_config_dump('saga.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('saga.queue', '');
SELECT pg_catalog.pg_extension_config_dump('saga.queue_seq', '');

CREATE VIEW saga.outbox AS
SELECT q.message_id, q.topic, q.key, q.destination,
       CASE WHEN q.lease_until > pg_catalog.now() THEN 'in_flight'
            WHEN q.attempts > 0 THEN 'retrying'
            WHEN q.next_attempt_at > pg_catalog.now() THEN 'scheduled'
            ELSE 'pending' END AS status,
       q.attempts, q.next_attempt_at, q.last_error, q.last_status, q.published_at
FROM saga.queue q
WHERE q.status = 'pending';
COMMENT ON VIEW saga.outbox IS 'messages not yet delivered, per destination';

CREATE VIEW saga.dead_letters AS
SELECT q.message_id, q.topic, q.key, q.destination, q.attempts, q.last_error,
       q.last_status, q.finished_at AS dead_at, q.payload, q.headers, q.published_at
FROM saga.queue q
WHERE q.status = 'dead';
COMMENT ON VIEW saga.dead_letters IS 'messages that could not be delivered; requeue with saga.redeliver()';

CREATE FUNCTION saga.create_destination(name text, url text, options jsonb DEFAULT '{}')
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_create_destination';
COMMENT ON FUNCTION saga.create_destination(text, text, jsonb) IS 'declare a place the worker may deliver to: notify:<channel> or http(s)://...';

CREATE FUNCTION saga.drop_destination(name text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_drop_destination';
COMMENT ON FUNCTION saga.drop_destination(text) IS 'remove a destination and its subscriptions (refused while messages to it are pending)';

CREATE FUNCTION saga.subscribe(topic text, destination text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_subscribe';
COMMENT ON FUNCTION saga.subscribe(text, text) IS 'send messages of a topic (or a prefix such as "order.*") to a destination';

CREATE FUNCTION saga.unsubscribe(topic text, destination text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_unsubscribe';
COMMENT ON FUNCTION saga.unsubscribe(text, text) IS 'stop sending a topic pattern to a destination';

CREATE FUNCTION saga.publish(topic text, payload jsonb, key text DEFAULT NULL,
                             headers jsonb DEFAULT NULL, deliver_at timestamptz DEFAULT NULL)
RETURNS uuid LANGUAGE c AS 'MODULE_PATHNAME', 'saga_publish';
COMMENT ON FUNCTION saga.publish(text, jsonb, text, jsonb, timestamptz) IS 'queue a message in the current transaction; returns its id, the idempotency key receivers see';

CREATE FUNCTION saga.message(id uuid)
RETURNS jsonb LANGUAGE c AS 'MODULE_PATHNAME', 'saga_message';
COMMENT ON FUNCTION saga.message(uuid) IS 'a message that is pending, dead-lettered, or was sent to NOTIFY without its payload';

CREATE FUNCTION saga.redeliver(message_id uuid, destination text DEFAULT NULL)
RETURNS integer LANGUAGE c AS 'MODULE_PATHNAME', 'saga_redeliver';
COMMENT ON FUNCTION saga.redeliver(uuid, text) IS 'requeue a dead-lettered message (for one destination, or all); returns how many';

CREATE FUNCTION saga.metrics()
RETURNS TABLE (name text, labels jsonb, value double precision)
LANGUAGE c AS 'MODULE_PATHNAME', 'saga_metrics';
COMMENT ON FUNCTION saga.metrics() IS 'counters and gauges: published, delivered, retried, dead-lettered, pending, lag';

CREATE FUNCTION saga.worker_status()
RETURNS TABLE (kind text, database text, pid integer, state text,
               started_at timestamptz, last_cycle_at timestamptz, in_flight integer)
LANGUAGE c AS 'MODULE_PATHNAME', 'saga_worker_status';
COMMENT ON FUNCTION saga.worker_status() IS 'the launcher and each database worker, with pid and state';

-- Privileges: nothing for PUBLIC but the application API.
REVOKE ALL ON ALL TABLES IN SCHEMA saga FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA saga FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA saga FROM PUBLIC;
GRANT USAGE ON SCHEMA saga TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.publish(text, jsonb, text, jsonb, timestamptz) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.message(uuid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.worker_status() TO PUBLIC;

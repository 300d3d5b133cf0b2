-- saga 0.1: destinations, the transactional outbox, NOTIFY and HTTP delivery

\echo Use "CREATE EXTENSION saga" to load this file. \quit

CREATE SCHEMA saga;
COMMENT ON SCHEMA saga IS 'sagas and a transactional outbox';

-- Where the worker may send things. Declared by administrators only: the
-- worker never connects anywhere that is not in this table.
CREATE TABLE saga.destinations (
    name text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('notify', 'http', 'postgresql')),
    target text NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}',
    timeout interval NOT NULL,
    max_attempts integer NOT NULL,
    backoff interval NOT NULL,
    max_backoff interval NOT NULL,
    concurrency integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE saga.destinations IS 'where the worker may deliver: NOTIFY channels, HTTP endpoints and other databases (headers and conninfo may hold secrets)';

CREATE TABLE saga.subscriptions (
    pattern text NOT NULL,
    destination text NOT NULL REFERENCES saga.destinations (name),
    prefix text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, destination)
);
COMMENT ON TABLE saga.subscriptions IS 'which topics go to which destination; pattern "x.*" has prefix "x."';

-- Backends cache the subscriptions for publish; any change makes them reread.
CREATE FUNCTION saga.config_changed()
RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'saga_config_changed';
COMMENT ON FUNCTION saga.config_changed() IS 'internal: tells backends to reread saga.subscriptions, saga.handlers and saga.definitions after commit';
CREATE TRIGGER subscriptions_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON saga.subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION saga.config_changed();

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
    saga_call jsonb,
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
COMMENT ON COLUMN saga.queue.saga_call IS 'for the call of a saga step: which saga, step and attempt it answers (NULL for messages)';

-- pg_dump keeps what users declared and what is still to be delivered
SELECT pg_catalog.pg_extension_config_dump('saga.destinations', '');
SELECT pg_catalog.pg_extension_config_dump('saga.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('saga.queue', '');
SELECT pg_catalog.pg_extension_config_dump('saga.queue_seq', '');

CREATE VIEW saga.outbox(message_id, topic, key, destination, status, attempts, next_attempt_at,
                        last_error, last_status, published_at) AS
SELECT q.message_id, q.topic, q.key, q.destination,
       CASE WHEN q.lease_until > pg_catalog.now() THEN 'in_flight'
            WHEN q.attempts > 0 THEN 'retrying'
            WHEN q.next_attempt_at > pg_catalog.now() THEN 'scheduled'
            ELSE 'pending' END AS status,
       q.attempts, q.next_attempt_at, q.last_error, q.last_status, q.published_at
FROM saga.queue q
WHERE q.status = 'pending';
COMMENT ON VIEW saga.outbox IS 'messages not yet delivered, per destination';

CREATE VIEW saga.dead_letters(message_id, topic, key, destination, attempts, last_error, last_status,
                              dead_at, payload, headers, published_at) AS
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
COMMENT ON FUNCTION saga.redeliver(uuid, text) IS 'requeue a dead-lettered message (for one destination, or all, and a dead inbox message); returns how many';

CREATE FUNCTION saga.metrics()
RETURNS TABLE (name text, labels jsonb, value double precision)
LANGUAGE c AS 'MODULE_PATHNAME', 'saga_metrics';
COMMENT ON FUNCTION saga.metrics() IS 'counters and gauges: published, delivered, retried, dead-lettered, pending, lag';

CREATE FUNCTION saga.worker_status()
RETURNS TABLE (kind text, database text, pid integer, state text,
               started_at timestamptz, last_cycle_at timestamptz, in_flight integer)
LANGUAGE c AS 'MODULE_PATHNAME', 'saga_worker_status';
COMMENT ON FUNCTION saga.worker_status() IS 'the launcher and each database worker, with pid and state';

-- ---------- Sagas ----------

-- Saga definitions, one row per version. steps holds the definition in the
-- form the worker runs: every step with its action and compensation resolved
-- (functions as schema-qualified signatures) and its retry settings.
CREATE TABLE saga.definitions (
    name text NOT NULL,
    version integer NOT NULL,
    definition jsonb NOT NULL,
    steps jsonb NOT NULL,
    deadline interval,
    owner oid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
COMMENT ON TABLE saga.definitions IS 'saga definitions, one row per version (internal; use saga.define())';
CREATE TRIGGER definitions_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON saga.definitions
    FOR EACH STATEMENT EXECUTE FUNCTION saga.config_changed();

-- One row per saga. next_run_at says when the worker has something to do
-- for it (a step, a retry, a compensation, its deadline); NULL: nothing.
CREATE TABLE saga.instances (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    version integer,
    driver text NOT NULL CHECK (driver IN ('worker', 'application')),
    status text NOT NULL CHECK (status IN ('running', 'completed', 'compensating', 'compensated', 'failed')),
    input jsonb NOT NULL,
    results jsonb NOT NULL DEFAULT '{}',
    result jsonb,
    error text,
    owner oid NOT NULL,
    idempotency_key text,
    position integer NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    next_run_at timestamptz,
    request_id uuid,
    deadline timestamptz,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE UNIQUE INDEX instances_idempotency_key ON saga.instances (name, owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX instances_due ON saga.instances (next_run_at) WHERE next_run_at IS NOT NULL;
COMMENT ON TABLE saga.instances IS 'one row per saga (internal; read saga.sagas)';
COMMENT ON COLUMN saga.instances.request_id IS 'the HTTP call in flight for this saga, in saga.queue; the saga waits for its outcome';

-- Steps that ran or are being retried, with how to undo them.
CREATE TABLE saga.instance_steps (
    saga_id uuid NOT NULL,
    position integer NOT NULL,
    step text NOT NULL,
    status text NOT NULL CHECK (status IN ('running', 'retrying', 'done', 'failed', 'unknown',
                                           'compensated', 'compensation_failed')),
    attempts integer NOT NULL DEFAULT 0,
    result jsonb,
    error text,
    compensation jsonb,
    compensation_attempts integer NOT NULL DEFAULT 0,
    compensation_result jsonb,
    compensation_error text,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    compensated_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, position)
);
COMMENT ON TABLE saga.instance_steps IS 'the steps of each saga, their results and compensations (internal; read saga.saga_steps)';
COMMENT ON COLUMN saga.instance_steps.status IS 'running: an HTTP call is in flight; unknown: its attempts ran out without an answer, so it is compensated too';

SELECT pg_catalog.pg_extension_config_dump('saga.definitions', '');
SELECT pg_catalog.pg_extension_config_dump('saga.instances', '');
SELECT pg_catalog.pg_extension_config_dump('saga.instance_steps', '');

-- Can role see and control sagas owned by owner? Its own (or a role it is a
-- member of), or every saga for members of the extension's owner.
CREATE FUNCTION saga._may_control(role oid, owner oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT role = owner
        OR pg_has_role(role, owner, 'MEMBER')
        OR pg_has_role(role, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'saga'), 'MEMBER')
$$;

-- A step's action or compensation as written by the user, resolved.
-- Returns {"kind": "function", "function": "schema.f(jsonb)"},
-- {"kind": "http", "destination": d, "path": p} or
-- {"kind": "remote", "destination": d, "function": "schema.f"}.
CREATE FUNCTION saga._resolve_call(step text, field text, spec jsonb, caller oid, caller_path text)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    fname text;
    sig text;
    fn regprocedure;
    rettype oid;
    kind "char";
    retset boolean;
    nsp name;
    nsp_oid oid;
    dest text;
    dest_kind text;
    path text;
    bad text;
BEGIN
    IF jsonb_typeof(spec) = 'string' THEN
        fname := spec #>> '{}';
    ELSIF jsonb_typeof(spec) = 'object' THEN
        SELECT k INTO bad FROM jsonb_object_keys(spec) k WHERE k NOT IN ('function', 'destination', 'path') LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'step "%": % has an unknown field "%"', step, field, bad
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Allowed fields: function, destination, path.';
        END IF;
        IF spec ? 'path' AND NOT spec ? 'destination' THEN
            RAISE EXCEPTION 'step "%": % has a "path" but no "destination"', step, field
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A path belongs to an HTTP call: {"destination": "name", "path": "/p"}.';
        END IF;
        IF spec ? 'destination' THEN
            dest := spec ->> 'destination';
            SELECT d.kind INTO dest_kind FROM saga.destinations d WHERE d.name = dest;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'step "%": % names destination "%", which does not exist', step, field, dest
                    USING ERRCODE = 'undefined_object',
                          HINT = 'Create it with saga.create_destination().';
            END IF;
            IF dest_kind = 'postgresql' THEN
                IF spec ? 'path' THEN
                    RAISE EXCEPTION 'step "%": % has a "path", but destination "%" is a database', step, field, dest
                        USING ERRCODE = 'invalid_parameter_value',
                              HINT = 'A call into another database names a function: {"destination": "name", "function": "schema.f"}.';
                END IF;
                fname := spec ->> 'function';
                IF jsonb_typeof(spec -> 'function') IS DISTINCT FROM 'string'
                   OR fname !~ '^[[:alpha:]_][[:alnum:]_$]*(\.[[:alpha:]_][[:alnum:]_$]*)?$' THEN
                    RAISE EXCEPTION 'step "%": % needs a "function" such as "schema.f" to call in destination "%"', step, field, dest
                        USING ERRCODE = 'invalid_parameter_value',
                              DETAIL = 'The function runs in the other database through saga.invoke() or saga.compensate(); it takes the saga context (jsonb) and returns jsonb.';
                END IF;
                RETURN jsonb_build_object('kind', 'remote', 'destination', dest, 'function', fname);
            END IF;
            IF dest_kind <> 'http' THEN
                RAISE EXCEPTION 'step "%": % names destination "%", which is not an HTTP or postgresql destination', step, field, dest
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF spec ? 'function' THEN
                RAISE EXCEPTION 'step "%": % has both "destination" and "function"', step, field
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Destination "' || dest || '" is an HTTP destination: give a "path".';
            END IF;
            path := coalesce(spec ->> 'path', '');
            IF path <> '' AND left(path, 1) <> '/' OR path ~ '[[:cntrl:][:space:]]' THEN
                RAISE EXCEPTION 'step "%": % has an invalid path "%"', step, field, path
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'A path starts with "/" and has no spaces or control characters.';
            END IF;
            RETURN jsonb_build_object('kind', 'http', 'destination', dest, 'path', path);
        END IF;
        IF jsonb_typeof(spec -> 'function') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'step "%": % needs "function" or "destination"', step, field
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        fname := spec ->> 'function';
    ELSE
        RAISE EXCEPTION 'step "%": % must be a function name or an object', step, field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF fname IS NULL OR fname = '' THEN
        RAISE EXCEPTION 'step "%": % has an empty function name', step, field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    sig := fname || '(pg_catalog.jsonb)';
    -- resolve the name as the caller would: under the caller's search_path,
    -- calling only a fully qualified built-in while it is in effect
    PERFORM pg_catalog.set_config('search_path', caller_path, true);
    BEGIN
        fn := pg_catalog.to_regprocedure(sig);
    EXCEPTION WHEN OTHERS THEN
        fn := NULL;
    END;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF fn IS NULL THEN
        RAISE EXCEPTION 'step "%": % function %(jsonb) does not exist', step, field, fname
            USING ERRCODE = 'undefined_function',
                  HINT = 'A step function takes one jsonb argument (the saga context) and returns jsonb.';
    END IF;
    SELECT p.prorettype, p.prokind, p.proretset, n.nspname, p.pronamespace
    INTO rettype, kind, retset, nsp, nsp_oid
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = fn;
    IF kind <> 'f' OR retset THEN
        RAISE EXCEPTION 'step "%": % % is not a plain function returning one jsonb value', step, field, fn::text
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF nsp LIKE 'pg\_temp\_%' OR nsp_oid = pg_my_temp_schema() THEN
        RAISE EXCEPTION 'step "%": % % is a temporary function', step, field, fn::text
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A saga outlives the session that defines it.';
    END IF;
    IF NOT has_schema_privilege(caller, nsp_oid, 'USAGE') THEN
        RAISE EXCEPTION 'step "%": permission denied for schema %', step, nsp
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF rettype <> 'jsonb'::regtype THEN
        RAISE EXCEPTION 'step "%": % function % returns %, not jsonb', step, field, fn::text, rettype::regtype
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF NOT has_function_privilege(caller, fn, 'EXECUTE') THEN
        RAISE EXCEPTION 'step "%": permission denied for function %', step, fn::text
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN jsonb_build_object('kind', 'function', 'function', fn::text);
END
$$;

CREATE FUNCTION saga._interval(step text, field text, v jsonb) RETURNS interval
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    i interval;
BEGIN
    IF jsonb_typeof(v) <> 'string' THEN
        RAISE EXCEPTION '%: % must be an interval string such as "5s"', step, field
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        i := (v #>> '{}')::interval;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
        RAISE EXCEPTION '%: % "%" is not a valid interval', step, field, v #>> '{}'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF i <= interval '0' THEN
        RAISE EXCEPTION '%: % must be positive, not "%"', step, field, v #>> '{}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN i;
END
$$;

CREATE FUNCTION saga._define(name text, definition jsonb, caller oid, caller_path text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s jsonb;
    steps jsonb := '[]';
    step_name text;
    seen text[] := '{}';
    norm jsonb;
    deadline interval;
    prev_owner oid;
    v integer;
    i integer := 0;
    bad text;
BEGIN
    IF name = '' OR octet_length(name) > 63 THEN
        RAISE EXCEPTION 'saga name must have 1 to 63 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(definition) <> 'object' THEN
        RAISE EXCEPTION 'saga definition must be a JSON object with "steps"'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT k INTO bad FROM jsonb_object_keys(definition) k WHERE k NOT IN ('steps', 'deadline') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'saga definition has an unknown field "%"', bad
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Allowed fields: steps, deadline.';
    END IF;
    IF jsonb_typeof(definition -> 'steps') IS DISTINCT FROM 'array' OR jsonb_array_length(definition -> 'steps') = 0 THEN
        RAISE EXCEPTION 'saga definition needs a non-empty "steps" array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF definition ? 'deadline' THEN
        deadline := saga._interval('saga', 'deadline', definition -> 'deadline');
    END IF;

    FOR s IN SELECT value FROM jsonb_array_elements(definition -> 'steps') LOOP
        i := i + 1;
        IF jsonb_typeof(s) <> 'object' THEN
            RAISE EXCEPTION 'step % must be a JSON object', i USING ERRCODE = 'invalid_parameter_value';
        END IF;
        step_name := s ->> 'name';
        IF jsonb_typeof(s -> 'name') IS DISTINCT FROM 'string' OR step_name = '' OR octet_length(step_name) > 63 THEN
            RAISE EXCEPTION 'step % needs a "name" of 1 to 63 bytes', i USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF step_name = ANY (seen) THEN
            RAISE EXCEPTION 'step "%" is defined twice', step_name USING ERRCODE = 'invalid_parameter_value';
        END IF;
        seen := seen || step_name;
        SELECT k INTO bad FROM jsonb_object_keys(s) k
        WHERE k NOT IN ('name', 'action', 'compensation', 'timeout', 'max_attempts', 'backoff') LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'step "%" has an unknown field "%"', step_name, bad
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Allowed fields: name, action, compensation, timeout, max_attempts, backoff.';
        END IF;
        IF NOT s ? 'action' OR jsonb_typeof(s -> 'action') = 'null' THEN
            RAISE EXCEPTION 'step "%" has no "action"', step_name USING ERRCODE = 'invalid_parameter_value';
        END IF;
        norm := jsonb_build_object(
            'name', step_name,
            'action', saga._resolve_call(step_name, 'action', s -> 'action', caller, caller_path),
            'compensation', CASE WHEN jsonb_typeof(s -> 'compensation') IS NULL OR jsonb_typeof(s -> 'compensation') = 'null'
                                 THEN NULL
                                 ELSE saga._resolve_call(step_name, 'compensation', s -> 'compensation', caller, caller_path) END,
            'timeout_ms', CASE WHEN s ? 'timeout'
                               THEN (extract(epoch FROM saga._interval(format('step "%s"', step_name), 'timeout', s -> 'timeout')) * 1000)::bigint END,
            'backoff_ms', CASE WHEN s ? 'backoff'
                               THEN (extract(epoch FROM saga._interval(format('step "%s"', step_name), 'backoff', s -> 'backoff')) * 1000)::bigint
                               ELSE 1000 END,
            'max_attempts', CASE WHEN s ? 'max_attempts' THEN s -> 'max_attempts' ELSE '10' END);
        IF (norm ->> 'timeout_ms')::bigint > 86400000 THEN
            RAISE EXCEPTION 'step "%": timeout must be at most 1 day', step_name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(norm -> 'max_attempts') <> 'number' OR (norm ->> 'max_attempts') !~ '^[0-9]+$'
           OR (norm ->> 'max_attempts')::numeric NOT BETWEEN 1 AND 1000 THEN
            RAISE EXCEPTION 'step "%": max_attempts must be an integer from 1 to 1000', step_name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        steps := steps || jsonb_build_array(norm);
    END LOOP;

    -- a name belongs to the role that first defined it
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('saga.define:' || name));
    SELECT d.owner INTO prev_owner FROM saga.definitions d WHERE d.name = _define.name
    ORDER BY d.version DESC LIMIT 1 FOR UPDATE;
    IF FOUND AND NOT saga._may_control(caller, prev_owner) THEN
        RAISE EXCEPTION 'permission denied to redefine saga "%"', name
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('Saga "%s" was defined by role %s.', name, pg_get_userbyid(prev_owner));
    END IF;
    SELECT coalesce(max(d.version), 0) + 1 INTO v FROM saga.definitions d WHERE d.name = _define.name;
    INSERT INTO saga.definitions (name, version, definition, steps, deadline, owner)
    VALUES (name, v, definition, steps, deadline, coalesce(prev_owner, caller));
    RETURN v;
END
$$;

CREATE FUNCTION saga._start(p_name text, p_input jsonb, p_key text, caller oid, id uuid) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    def record;
    existing uuid;
BEGIN
    SELECT d.version, d.deadline INTO def FROM saga.definitions d
    WHERE d.name = p_name ORDER BY d.version DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'saga "%" is not defined', p_name
            USING ERRCODE = 'undefined_object', HINT = 'Define it with saga.define().';
    END IF;
    IF jsonb_typeof(p_input) <> 'object' THEN
        RAISE EXCEPTION 'saga input must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO saga.instances AS i (id, name, version, driver, status, input, owner, idempotency_key,
                                     next_run_at, deadline)
    VALUES (id, p_name, def.version, 'worker', 'running', p_input, caller, p_key,
            now(), now() + def.deadline)
    ON CONFLICT (name, owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF FOUND THEN
        RETURN id;
    END IF;
    SELECT i.id INTO existing FROM saga.instances i
    WHERE i.name = p_name AND i.owner = caller AND i.idempotency_key = p_key;
    RETURN existing;
END
$$;

CREATE FUNCTION saga._begin(p_name text, p_input jsonb, p_key text, p_deadline interval, caller oid, id uuid)
RETURNS uuid LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    existing uuid;
BEGIN
    IF p_name = '' OR octet_length(p_name) > 63 THEN
        RAISE EXCEPTION 'saga name must have 1 to 63 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(p_input) <> 'object' THEN
        RAISE EXCEPTION 'saga input must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_deadline <= interval '0' THEN
        RAISE EXCEPTION 'deadline must be positive, not "%"', p_deadline USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO saga.instances (id, name, version, driver, status, input, owner, idempotency_key,
                                next_run_at, deadline)
    VALUES (id, p_name, NULL, 'application', 'running', p_input, caller, p_key,
            now() + p_deadline, now() + p_deadline)
    ON CONFLICT (name, owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF FOUND THEN
        RETURN id;
    END IF;
    SELECT i.id INTO existing FROM saga.instances i
    WHERE i.name = p_name AND i.owner = caller AND i.idempotency_key = p_key;
    RETURN existing;
END
$$;

-- Lock a saga the caller may control, or raise a clear error.
CREATE FUNCTION saga._lock(id uuid, caller oid) RETURNS saga.instances
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
BEGIN
    SELECT * INTO s FROM saga.instances i WHERE i.id = _lock.id FOR UPDATE;
    IF NOT FOUND OR NOT saga._may_control(caller, s.owner) THEN
        RAISE EXCEPTION 'saga % does not exist', id
            USING ERRCODE = 'undefined_object';
    END IF;
    RETURN s;
END
$$;

CREATE FUNCTION saga._check_compensation(step text, c jsonb, caller oid, caller_path text) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    resolved jsonb;
    bad text;
BEGIN
    IF c IS NULL OR jsonb_typeof(c) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(c) <> 'object' THEN
        RAISE EXCEPTION 'step "%": compensation must be a JSON object such as {"function": "schema.f", "args": {}}', step
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT k INTO bad FROM jsonb_object_keys(c) k WHERE k NOT IN ('function', 'destination', 'path', 'args', 'body') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'step "%": compensation has an unknown field "%"', step, bad
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Allowed fields: function, args, destination, path, body.';
    END IF;
    resolved := saga._resolve_call(step, 'compensation', c - 'args' - 'body', caller, caller_path);
    IF c ? 'body' AND resolved ->> 'kind' <> 'http' THEN
        RAISE EXCEPTION 'step "%": a compensation "body" belongs to an HTTP call', step
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give a function''s arguments as "args".';
    END IF;
    IF c ? 'args' THEN
        resolved := resolved || jsonb_build_object('args', c -> 'args');
    END IF;
    IF c ? 'body' THEN
        resolved := resolved || jsonb_build_object('body', c -> 'body');
    END IF;
    RETURN resolved;
END
$$;

CREATE FUNCTION saga._step(id uuid, step text, compensation jsonb, result jsonb, caller oid, caller_path text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances := saga._lock(id, caller);
    comp jsonb;
BEGIN
    IF s.driver <> 'application' THEN
        RAISE EXCEPTION 'saga % is run by the worker', id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'saga.step() records steps of sagas begun with saga.begin().';
    END IF;
    IF s.status <> 'running' THEN
        RAISE EXCEPTION 'saga % is %, it takes no more steps', id, s.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF step = '' OR octet_length(step) > 63 THEN
        RAISE EXCEPTION 'step name must have 1 to 63 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM saga.instance_steps x WHERE x.saga_id = id AND x.step = _step.step) THEN
        RAISE EXCEPTION 'saga % already has a step "%"', id, step USING ERRCODE = 'unique_violation';
    END IF;
    comp := saga._check_compensation(step, compensation, caller, caller_path);
    INSERT INTO saga.instance_steps (saga_id, position, step, status, attempts, result, compensation, finished_at)
    VALUES (id, s.position, step, 'done', 1, result, comp, now());
    UPDATE saga.instances i
    SET position = i.position + 1,
        results = i.results || jsonb_build_object(step, result),
        updated_at = now()
    WHERE i.id = _step.id;
END
$$;

CREATE FUNCTION saga._complete(id uuid, result jsonb, caller oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances := saga._lock(id, caller);
BEGIN
    IF s.status = 'completed' THEN
        RAISE NOTICE 'saga % is already completed', id;
        RETURN;
    END IF;
    IF s.driver <> 'application' THEN
        RAISE EXCEPTION 'saga % is run by the worker; it completes by itself', id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF s.status <> 'running' THEN
        RAISE EXCEPTION 'saga % is %, it cannot complete', id, s.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE saga.instances i
    SET status = 'completed', result = _complete.result, next_run_at = NULL,
        updated_at = now(), finished_at = now()
    WHERE i.id = _complete.id;
END
$$;

-- fail (application) and cancel (anyone who controls the saga): a running
-- saga starts compensating; asking again is a no-op.
CREATE FUNCTION saga._abort(id uuid, reason text, caller oid, action text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances := saga._lock(id, caller);
BEGIN
    IF action = 'fail' AND s.driver <> 'application' THEN
        RAISE EXCEPTION 'saga % is run by the worker', id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Use saga.cancel() to stop it.';
    END IF;
    IF s.status IN ('compensating', 'compensated', 'failed') THEN
        RAISE NOTICE 'saga % is already %', id, s.status;
        RETURN;
    END IF;
    IF s.status = 'completed' THEN
        RAISE EXCEPTION 'saga % is already completed', id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A completed saga is not compensated.';
    END IF;
    UPDATE saga.instances i
    SET status = 'compensating', error = reason, attempts = 0, next_run_at = now(), updated_at = now()
    WHERE i.id = _abort.id;
END
$$;

CREATE FUNCTION saga._retry(id uuid, caller oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances := saga._lock(id, caller);
BEGIN
    IF s.status <> 'failed' THEN
        RAISE EXCEPTION 'saga % is %, only a failed saga can be retried', id, s.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE saga.instance_steps x SET status = 'done', compensation_attempts = 0, updated_at = now()
    WHERE x.saga_id = id AND x.status = 'compensation_failed';
    UPDATE saga.instances i
    SET status = 'compensating', attempts = 0, next_run_at = now(), updated_at = now(), finished_at = NULL
    WHERE i.id = _retry.id;
END
$$;

CREATE FUNCTION saga._get(id uuid, caller oid) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
    steps jsonb;
    timeline jsonb;
BEGIN
    SELECT * INTO s FROM saga.instances i WHERE i.id = _get.id;
    IF NOT FOUND OR NOT saga._may_control(caller, s.owner) THEN
        RAISE EXCEPTION 'saga % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
               'step', x.step, 'position', x.position, 'status', x.status, 'attempts', x.attempts,
               'result', x.result, 'error', x.error, 'compensation', x.compensation,
               'compensation_attempts', nullif(x.compensation_attempts, 0),
               'compensation_result', x.compensation_result, 'compensation_error', x.compensation_error,
               'started_at', x.started_at, 'finished_at', x.finished_at, 'compensated_at', x.compensated_at))
               ORDER BY x.position), '[]')
    INTO steps FROM saga.instance_steps x WHERE x.saga_id = id;
    SELECT coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('at', e.at, 'event', e.event, 'step', e.step))
                              ORDER BY e.at, e.ord), '[]')
    INTO timeline
    FROM (SELECT s.started_at AS at, 0 AS ord, 'started' AS event, NULL::text AS step
          UNION ALL
          SELECT x.finished_at, 1 + x.position, CASE WHEN x.status = 'failed' THEN 'step failed'
                      -- an unknown outcome stays unknown once compensated
                      WHEN x.status = 'unknown' OR (x.result IS NULL AND x.error IS NOT NULL)
                      THEN 'step outcome unknown' ELSE 'step done' END, x.step
          FROM saga.instance_steps x WHERE x.saga_id = id AND x.finished_at IS NOT NULL
          UNION ALL
          SELECT x.compensated_at, 100000 - x.position, 'step compensated', x.step
          FROM saga.instance_steps x WHERE x.saga_id = id AND x.compensated_at IS NOT NULL
          UNION ALL
          SELECT s.finished_at, 200000, s.status, NULL
          WHERE s.finished_at IS NOT NULL) e;
    RETURN jsonb_strip_nulls(jsonb_build_object(
        'id', s.id, 'name', s.name, 'version', s.version, 'driver', s.driver, 'status', s.status,
        'input', s.input, 'result', s.result, 'error', s.error,
        'started_at', s.started_at, 'updated_at', s.updated_at, 'deadline', s.deadline,
        'finished_at', s.finished_at, 'steps', steps, 'timeline', timeline));
END
$$;

CREATE FUNCTION saga._status(id uuid, caller oid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
BEGIN
    SELECT * INTO s FROM saga.instances i WHERE i.id = _status.id;
    IF NOT FOUND OR NOT saga._may_control(caller, s.owner) THEN
        RAISE EXCEPTION 'saga % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    RETURN s.status;
END
$$;

-- ---------- the worker's side ----------

-- What the worker does next for a saga it has locked: settle its state
-- (deadline, completion, end of compensation) and return the next call to
-- make, or nothing. The call is (phase, position, step, call, ctx, attempt,
-- max_attempts, backoff_ms); phase is 'action' or 'compensation'.
CREATE FUNCTION saga._next(s saga.instances,
    OUT saga_id uuid, OUT owner oid, OUT phase text, OUT step_position integer, OUT step text,
    OUT call jsonb, OUT ctx jsonb, OUT attempt integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    def jsonb;
    st jsonb;
    x saga.instance_steps;
BEGIN
    saga_id := s.id;
    owner := s.owner;
    IF s.status = 'running' AND s.deadline <= clock_timestamp() THEN
        UPDATE saga.instances i SET status = 'compensating', attempts = 0,
            error = coalesce(i.error, 'deadline passed'), updated_at = clock_timestamp()
        WHERE i.id = s.id RETURNING * INTO s;
    END IF;

    IF s.status = 'running' AND s.driver = 'application' THEN
        UPDATE saga.instances i SET next_run_at = i.deadline WHERE i.id = s.id;
        RETURN;
    END IF;

    IF s.status = 'running' THEN
        SELECT d.steps INTO def FROM saga.definitions d WHERE d.name = s.name AND d.version = s.version;
        IF s.position >= jsonb_array_length(def) THEN
            UPDATE saga.instances i SET status = 'completed', next_run_at = NULL, attempts = 0,
                updated_at = clock_timestamp(), finished_at = clock_timestamp()
            WHERE i.id = s.id;
            RETURN;
        END IF;
        st := def -> s.position;
        phase := 'action';
        step_position := s.position;
        step := st ->> 'name';
        call := (st -> 'action') || jsonb_build_object('max_attempts', st -> 'max_attempts',
                    'backoff_ms', st -> 'backoff_ms', 'timeout_ms', st -> 'timeout_ms');
        attempt := s.attempts + 1;
        ctx := jsonb_build_object('saga_id', s.id, 'saga', s.name, 'input', s.input,
                                  'steps', s.results, 'step', step, 'attempt', attempt);
        RETURN;
    END IF;

    IF s.status = 'compensating' AND s.request_id IS NOT NULL THEN
        -- an HTTP call is still out: compensate once its outcome is known,
        -- so a compensation never overtakes its action (_received resumes)
        UPDATE saga.instances i SET next_run_at = NULL WHERE i.id = s.id;
        RETURN;
    END IF;

    IF s.status = 'compensating' THEN
        -- newest first: the latest step that is done (or whose outcome is
        -- unknown) and has a compensation still to run
        SELECT * INTO x FROM saga.instance_steps y
        WHERE y.saga_id = s.id AND y.status IN ('done', 'retrying', 'running', 'unknown')
          AND y.compensation IS NOT NULL
        ORDER BY y.position DESC LIMIT 1;
        IF NOT FOUND THEN
            UPDATE saga.instances i SET status = 'compensated', next_run_at = NULL, attempts = 0,
                updated_at = clock_timestamp(), finished_at = clock_timestamp()
            WHERE i.id = s.id;
            RETURN;
        END IF;
        phase := 'compensation';
        step_position := x.position;
        step := x.step;
        call := x.compensation || jsonb_build_object('max_attempts', 10, 'backoff_ms', 1000);
        IF s.driver = 'worker' THEN
            SELECT (d.steps -> x.position) -> 'max_attempts', (d.steps -> x.position) -> 'backoff_ms'
            INTO st, def FROM saga.definitions d WHERE d.name = s.name AND d.version = s.version;
            call := call || jsonb_build_object('max_attempts', st, 'backoff_ms', def);
        END IF;
        attempt := x.compensation_attempts + 1;
        ctx := jsonb_build_object('saga_id', s.id, 'saga', s.name, 'input', s.input,
                                  'steps', s.results, 'step', step, 'attempt', attempt,
                                  'error', s.error);
        IF x.compensation ? 'args' THEN
            ctx := ctx || jsonb_build_object('args', x.compensation -> 'args');
        END IF;
        RETURN;
    END IF;

    -- terminal: nothing to do
    UPDATE saga.instances i SET next_run_at = NULL WHERE i.id = s.id AND i.next_run_at IS NOT NULL;
END
$$;

-- Sagas the worker has something to do for, locked, each with its next call.
CREATE FUNCTION saga._claim(lim integer)
RETURNS TABLE (saga_id uuid, owner oid, phase text, step_position integer, step text,
               call jsonb, ctx jsonb, attempt integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
BEGIN
    FOR s IN SELECT * FROM saga.instances i
             WHERE i.next_run_at <= now()
             ORDER BY i.next_run_at LIMIT lim
             FOR UPDATE SKIP LOCKED LOOP
        SELECT * INTO saga_id, owner, phase, step_position, step, call, ctx, attempt FROM saga._next(s);
        IF phase IS NOT NULL THEN
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- A call succeeded: record its result and return the saga's next call.
CREATE FUNCTION saga._succeeded(id uuid, phase text, pos integer, step text, n integer, result jsonb,
    OUT saga_id uuid, OUT owner oid, OUT next_phase text, OUT step_position integer, OUT next_step text,
    OUT next_call jsonb, OUT ctx jsonb, OUT attempt integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
    comp jsonb;
BEGIN
    IF phase = 'action' THEN
        SELECT (d.steps -> pos) -> 'compensation' INTO comp
        FROM saga.instances i JOIN saga.definitions d ON d.name = i.name AND d.version = i.version
        WHERE i.id = _succeeded.id;
        IF jsonb_typeof(comp) = 'null' THEN
            comp := NULL;
        END IF;
        INSERT INTO saga.instance_steps AS x (saga_id, position, step, status, attempts, result, compensation, finished_at)
        VALUES (id, pos, step, 'done', n, result, comp, clock_timestamp())
        ON CONFLICT ON CONSTRAINT instance_steps_pkey DO UPDATE
        SET status = 'done', attempts = excluded.attempts, result = excluded.result, error = NULL,
            finished_at = clock_timestamp(), updated_at = clock_timestamp();
        UPDATE saga.instances i
        SET position = pos + 1, attempts = 0, results = i.results || jsonb_build_object(step, result),
            updated_at = clock_timestamp()
        WHERE i.id = _succeeded.id RETURNING * INTO s;
    ELSE
        UPDATE saga.instance_steps x
        SET status = 'compensated', compensation_attempts = n,
            compensation_result = result, compensation_error = NULL, compensated_at = clock_timestamp(), updated_at = clock_timestamp()
        WHERE x.saga_id = id AND x.position = pos;
        UPDATE saga.instances i SET attempts = 0, updated_at = clock_timestamp()
        WHERE i.id = _succeeded.id RETURNING * INTO s;
    END IF;
    SELECT * INTO saga_id, owner, next_phase, step_position, next_step, next_call, ctx, attempt FROM saga._next(s);
END
$$;

-- A call failed. transient: worth retrying (connection, serialization,
-- resources, shutdown, lock time-out). Returns the saga's next call when it
-- can go on at once (its first compensation), else nothing.
CREATE FUNCTION saga._failed(id uuid, phase text, pos integer, step text, n integer, call jsonb,
    transient boolean, error text,
    OUT saga_id uuid, OUT owner oid, OUT next_phase text, OUT step_position integer, OUT next_step text,
    OUT next_call jsonb, OUT ctx jsonb, OUT attempt integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
    unknown boolean;
    max_attempts integer := coalesce((call ->> 'max_attempts')::integer, 10);
    delay interval := least(interval '5 minutes',
        make_interval(secs => coalesce((call ->> 'backoff_ms')::float8, 1000) / 1000
                              * power(2, least(n - 1, 20)) * (0.75 + random() / 2)));
BEGIN
    IF phase = 'action' THEN
        IF transient AND n < max_attempts THEN
            INSERT INTO saga.instance_steps AS x (saga_id, position, step, status, attempts, error)
            VALUES (id, pos, step, 'retrying', n, error)
            ON CONFLICT ON CONSTRAINT instance_steps_pkey DO UPDATE
            SET status = 'retrying', attempts = excluded.attempts, error = excluded.error,
                updated_at = clock_timestamp();
            -- (an answer that comes after a cancel: compensate at once)
            UPDATE saga.instances i SET attempts = n, updated_at = clock_timestamp(),
                next_run_at = CASE WHEN i.status = 'running' THEN least(clock_timestamp() + delay, i.deadline)
                                   ELSE clock_timestamp() END
            WHERE i.id = _failed.id;
            RETURN;
        END IF;
        -- A step that never succeeded has nothing to compensate: local steps
        -- roll back with their subtransaction, and a refusal (4xx) did
        -- nothing. A call to a destination that never got an answer may have
        -- taken effect: its outcome is unknown and it keeps its compensation.
        unknown := transient AND call ->> 'kind' IN ('http', 'remote');
        INSERT INTO saga.instance_steps AS x (saga_id, position, step, status, attempts, error, finished_at)
        VALUES (id, pos, step, CASE WHEN unknown THEN 'unknown' ELSE 'failed' END, n, error, clock_timestamp())
        ON CONFLICT ON CONSTRAINT instance_steps_pkey DO UPDATE
        SET status = excluded.status, attempts = excluded.attempts, error = excluded.error,
            compensation = CASE WHEN unknown THEN x.compensation END,
            finished_at = clock_timestamp(), updated_at = clock_timestamp();
        UPDATE saga.instances i
        SET status = 'compensating', attempts = 0, updated_at = clock_timestamp(), next_run_at = clock_timestamp(),
            error = coalesce(i.error, format('step "%s" failed%s: %s', step,
                           CASE WHEN transient THEN format(' after %s attempts', n) ELSE '' END, error))
        WHERE i.id = _failed.id RETURNING * INTO s;
        SELECT * INTO saga_id, owner, next_phase, step_position, next_step, next_call, ctx, attempt FROM saga._next(s);
        RETURN;
    END IF;

    -- a compensation is retried whatever the error, until its attempts run out
    IF n < max_attempts THEN
        UPDATE saga.instance_steps x SET compensation_attempts = n, compensation_error = error, updated_at = clock_timestamp()
        WHERE x.saga_id = id AND x.position = pos;
        UPDATE saga.instances i SET next_run_at = clock_timestamp() + delay, updated_at = clock_timestamp()
        WHERE i.id = _failed.id;
        RETURN;
    END IF;
    UPDATE saga.instance_steps x
    SET status = 'compensation_failed', compensation_attempts = n, compensation_error = error, updated_at = clock_timestamp()
    WHERE x.saga_id = id AND x.position = pos;
    UPDATE saga.instances i
    SET status = 'failed', next_run_at = NULL, updated_at = clock_timestamp(), finished_at = clock_timestamp(),
        error = format('%s; compensation of step "%s" failed after %s attempts: %s',
                       coalesce(i.error, 'saga failed'), step, n, error)
    WHERE i.id = _failed.id;
END
$$;

-- Send a call to a destination (HTTP, or a function in another database):
-- queue it (saga.queue, with the saga's coordinates in saga_call) and let
-- the saga wait for the outcome. The delivery path sends it and calls
-- saga._received. An action in flight is marked running with its
-- compensation: if the saga is cancelled or passes its deadline meanwhile,
-- the call may still take effect. A call into another database goes to
-- saga.invoke with key "<saga id>:<step>"; the compensation of a step the
-- worker ran there goes to saga.compensate with that same key, so it runs
-- only if the action did. An application-driven step was done by the
-- application, not through saga.invoke: its compensation is invoked with
-- key "<saga id>:<step>:compensation".
CREATE FUNCTION saga._send(id uuid, phase text, pos integer, step text, n integer, call jsonb,
    ctx jsonb, request uuid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    s saga.instances;
    dest text := call ->> 'destination';
    comp jsonb;
    remote boolean := call ->> 'kind' = 'remote';
    suffix text := CASE WHEN phase = 'compensation' THEN ':compensation' ELSE '' END;
    method text := 'invoke';
BEGIN
    IF NOT EXISTS (SELECT FROM saga.destinations d WHERE d.name = dest
                   AND d.kind = CASE WHEN remote THEN 'postgresql' ELSE 'http' END) THEN
        PERFORM saga._failed(id, phase, pos, step, n, call, false,
                             format('%s destination "%s" does not exist',
                                    CASE WHEN remote THEN 'postgresql' ELSE 'HTTP' END, dest));
        RETURN;
    END IF;
    SELECT * INTO s FROM saga.instances i WHERE i.id = _send.id;
    IF remote AND phase = 'compensation' AND s.driver = 'worker' THEN
        method := 'compensate';
        suffix := '';
    END IF;
    INSERT INTO saga.queue (message_id, destination, topic, payload, next_attempt_at, saga_call)
    VALUES (request, dest, s.name || '.' || step || CASE WHEN phase = 'compensation' THEN '.compensation' ELSE '' END,
            CASE WHEN call ? 'body' THEN call -> 'body' ELSE ctx END,
            now(),
            jsonb_build_object('saga_id', id, 'phase', phase, 'position', pos, 'step', step,
                               'attempt', n, 'call', call, 'path', coalesce(call ->> 'path', ''),
                               'timeout_ms', call -> 'timeout_ms',
                               'method', method, 'key', id::text || ':' || step || suffix));
    IF phase = 'action' THEN
        SELECT (d.steps -> pos) -> 'compensation' INTO comp
        FROM saga.definitions d WHERE d.name = s.name AND d.version = s.version;
        IF jsonb_typeof(comp) = 'null' THEN
            comp := NULL;
        END IF;
        INSERT INTO saga.instance_steps AS x (saga_id, position, step, status, attempts, compensation)
        VALUES (id, pos, step, 'running', n, comp)
        ON CONFLICT ON CONSTRAINT instance_steps_pkey DO UPDATE
        SET status = 'running', attempts = excluded.attempts, compensation = excluded.compensation,
            updated_at = clock_timestamp();
    END IF;
    -- while it waits, only the deadline of a running saga wakes it
    UPDATE saga.instances i
    SET request_id = request, updated_at = clock_timestamp(),
        next_run_at = CASE WHEN phase = 'action' THEN i.deadline END
    WHERE i.id = _send.id;
END
$$;

-- The outcome of a saga's call to a destination (outcome 0: success, 1:
-- worth another attempt, 2: refused). The queue row must still be the claimed attempt
-- (the same fence as for messages); an answer the saga no longer waits for
-- is dropped.
CREATE FUNCTION saga._received(tid tid, request uuid, claim integer, outcome integer, body text, error text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    c jsonb;
    id uuid;
    result jsonb;
BEGIN
    DELETE FROM saga.queue q
    WHERE q.ctid = tid AND q.message_id = request AND q.attempts = claim AND q.status = 'pending'
    RETURNING q.saga_call INTO c;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    id := (c ->> 'saga_id')::uuid;
    UPDATE saga.instances i SET request_id = NULL, next_run_at = clock_timestamp()
    WHERE i.id = id AND i.request_id = request;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF outcome = 0 THEN
        -- the response, as JSON if it is JSON
        IF body IS NULL OR body = '' THEN
            result := NULL;
        ELSE
            BEGIN
                result := body::jsonb;
            EXCEPTION WHEN OTHERS THEN
                result := to_jsonb(body);
            END;
        END IF;
        PERFORM saga._succeeded(id, c ->> 'phase', (c ->> 'position')::integer, c ->> 'step',
                                (c ->> 'attempt')::integer, result);
    ELSE
        PERFORM saga._failed(id, c ->> 'phase', (c ->> 'position')::integer, c ->> 'step',
                             (c ->> 'attempt')::integer, c -> 'call', outcome = 1, error);
    END IF;
END
$$;

COMMENT ON FUNCTION saga._may_control(oid, oid) IS 'internal: may a role see and control sagas owned by another role';
COMMENT ON FUNCTION saga._resolve_call(text, text, jsonb, oid, text) IS 'internal: validate and resolve a step action or compensation';
COMMENT ON FUNCTION saga._interval(text, text, jsonb) IS 'internal: read an interval of a saga definition';
COMMENT ON FUNCTION saga._define(text, jsonb, oid, text) IS 'internal: saga.define() as the extension owner';
COMMENT ON FUNCTION saga._start(text, jsonb, text, oid, uuid) IS 'internal: saga.start() as the extension owner';
COMMENT ON FUNCTION saga._begin(text, jsonb, text, interval, oid, uuid) IS 'internal: saga.begin() as the extension owner';
COMMENT ON FUNCTION saga._lock(uuid, oid) IS 'internal: lock a saga the caller may control';
COMMENT ON FUNCTION saga._check_compensation(text, jsonb, oid, text) IS 'internal: validate a compensation given to saga.step()';
COMMENT ON FUNCTION saga._step(uuid, text, jsonb, jsonb, oid, text) IS 'internal: saga.step() as the extension owner';
COMMENT ON FUNCTION saga._complete(uuid, jsonb, oid) IS 'internal: saga.complete() as the extension owner';
COMMENT ON FUNCTION saga._abort(uuid, text, oid, text) IS 'internal: saga.fail() and saga.cancel() as the extension owner';
COMMENT ON FUNCTION saga._retry(uuid, oid) IS 'internal: saga.retry() as the extension owner';
COMMENT ON FUNCTION saga._get(uuid, oid) IS 'internal: saga.get() as the extension owner';
COMMENT ON FUNCTION saga._status(uuid, oid) IS 'internal: the status saga.wait() polls';
COMMENT ON FUNCTION saga._next(saga.instances) IS 'internal (worker): settle a saga and return its next call';
COMMENT ON FUNCTION saga._claim(integer) IS 'internal (worker): lock due sagas and return their next calls';
COMMENT ON FUNCTION saga._succeeded(uuid, text, integer, text, integer, jsonb) IS 'internal (worker): record a call that succeeded';
COMMENT ON FUNCTION saga._failed(uuid, text, integer, text, integer, jsonb, boolean, text) IS 'internal (worker): record a call that failed';
COMMENT ON FUNCTION saga._send(uuid, text, integer, text, integer, jsonb, jsonb, uuid) IS 'internal (worker): queue the call of a saga step to a destination';
COMMENT ON FUNCTION saga._received(tid, uuid, integer, integer, text, text) IS 'internal (worker): record the outcome of a saga step''s call to a destination';

-- ---------- views ----------

CREATE VIEW saga.sagas(id, name, version, status, input, error, started_at, updated_at, deadline,
                       driver, owner, idempotency_key, result, finished_at) WITH (security_barrier) AS
SELECT i.id, i.name, i.version, i.status, i.input, i.error, i.started_at, i.updated_at, i.deadline,
       i.driver, pg_catalog.pg_get_userbyid(i.owner) AS owner, i.idempotency_key, i.result, i.finished_at
FROM saga.instances i
WHERE saga._may_control((SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), i.owner);
COMMENT ON VIEW saga.sagas IS 'sagas of the current role (every saga for administrators)';

CREATE VIEW saga.saga_steps(saga_id, step, position, status, attempts, result, error, updated_at,
                            compensation, compensation_attempts, compensation_error, started_at,
                            finished_at, compensated_at) WITH (security_barrier) AS
SELECT x.saga_id, x.step, x.position, x.status, x.attempts, x.result, x.error, x.updated_at,
       x.compensation, x.compensation_attempts, x.compensation_error, x.started_at, x.finished_at, x.compensated_at
FROM saga.instance_steps x JOIN saga.instances i ON i.id = x.saga_id
WHERE saga._may_control((SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), i.owner);
COMMENT ON VIEW saga.saga_steps IS 'steps of the current role''s sagas, with results, attempts and errors';

CREATE VIEW saga.stuck(id, name, status, reason, since) WITH (security_barrier) AS
SELECT i.id, i.name, i.status,
       CASE WHEN i.status = 'failed' THEN i.error
            ELSE format('deadline passed at %s', i.deadline) END AS reason,
       CASE WHEN i.status = 'failed' THEN i.finished_at ELSE i.deadline END AS since
FROM saga.instances i
WHERE (i.status = 'failed' OR (i.status IN ('running', 'compensating') AND i.deadline < pg_catalog.now()))
  AND saga._may_control((SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), i.owner);
COMMENT ON VIEW saga.stuck IS 'sagas that need an operator: failed compensations, or past their deadline';

-- ---------- the saga API ----------

CREATE FUNCTION saga.define(name text, definition jsonb)
RETURNS integer LANGUAGE c AS 'MODULE_PATHNAME', 'saga_define';
COMMENT ON FUNCTION saga.define(text, jsonb) IS 'define a saga (a new version if it exists); returns the version';

CREATE FUNCTION saga.start(name text, input jsonb DEFAULT '{}', idempotency_key text DEFAULT NULL)
RETURNS uuid LANGUAGE c AS 'MODULE_PATHNAME', 'saga_start';
COMMENT ON FUNCTION saga.start(text, jsonb, text) IS 'start a worker-driven saga in the current transaction; returns its id';

CREATE FUNCTION saga.begin(name text, input jsonb DEFAULT '{}', idempotency_key text DEFAULT NULL,
                           deadline interval DEFAULT '1 hour')
RETURNS uuid LANGUAGE c AS 'MODULE_PATHNAME', 'saga_begin';
COMMENT ON FUNCTION saga.begin(text, jsonb, text, interval) IS 'begin an application-driven saga; returns its id';

CREATE FUNCTION saga.step(saga_id uuid, step text, compensation jsonb DEFAULT NULL, result jsonb DEFAULT NULL)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_step';
COMMENT ON FUNCTION saga.step(uuid, text, jsonb, jsonb) IS 'record, in the current transaction, a step done and how to undo it';

CREATE FUNCTION saga.complete(saga_id uuid, result jsonb DEFAULT NULL)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_complete';
COMMENT ON FUNCTION saga.complete(uuid, jsonb) IS 'complete an application-driven saga';

CREATE FUNCTION saga.fail(saga_id uuid, reason text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_fail';
COMMENT ON FUNCTION saga.fail(uuid, text) IS 'fail an application-driven saga: the worker compensates its steps newest-first';

CREATE FUNCTION saga.cancel(saga_id uuid, reason text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_cancel';
COMMENT ON FUNCTION saga.cancel(uuid, text) IS 'fail a running saga from outside: the worker compensates what it did';

CREATE FUNCTION saga.retry(saga_id uuid)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_retry';
COMMENT ON FUNCTION saga.retry(uuid) IS 'resume the compensations of a failed saga';

CREATE FUNCTION saga.get(saga_id uuid)
RETURNS jsonb LANGUAGE c AS 'MODULE_PATHNAME', 'saga_get';
COMMENT ON FUNCTION saga.get(uuid) IS 'a saga: status, input, steps with results and errors, timeline';

CREATE FUNCTION saga.wait(saga_id uuid, timeout interval DEFAULT '30s')
RETURNS text LANGUAGE c AS 'MODULE_PATHNAME', 'saga_wait';
COMMENT ON FUNCTION saga.wait(uuid, interval) IS 'wait until a saga is completed, compensated or failed, or the timeout passes; returns its status';

-- Exactly-once calls: one row per action key, written in the caller's
-- transaction together with what the action did. Functions are recorded by
-- their qualified signature (an OID would not survive dump and restore, and
-- pg_upgrade refuses regprocedure columns).
CREATE TABLE saga.invocations (
    key text PRIMARY KEY CHECK (octet_length(key) BETWEEN 1 AND 512),
    status text NOT NULL CHECK (status IN ('executed', 'compensated', 'tombstone')),
    fn text,
    result jsonb,
    invoked_at timestamptz,
    invoked_by regrole,
    compensation_fn text,
    compensation_result jsonb,
    compensated_at timestamptz,
    compensated_by regrole,
    CHECK ((status = 'tombstone') = (invoked_at IS NULL)),
    CHECK ((status = 'executed') = (compensated_at IS NULL))
);
COMMENT ON TABLE saga.invocations IS 'actions run by saga.invoke() and compensated by saga.compensate(), one row per key; a tombstone is a compensation that came before its action';
COMMENT ON COLUMN saga.invocations.status IS 'executed: the action ran; compensated: it ran and was undone; tombstone: compensated before it ran, so it never will';
COMMENT ON COLUMN saga.invocations.fn IS 'the action function, schema-qualified (NULL for a tombstone)';
COMMENT ON COLUMN saga.invocations.result IS 'what the action function returned; saga.invoke() returns it again for a repeated key';
COMMENT ON COLUMN saga.invocations.compensation_fn IS 'the compensation function, schema-qualified';
COMMENT ON COLUMN saga.invocations.compensation_result IS 'what the compensation function returned (NULL for a tombstone)';
SELECT pg_catalog.pg_extension_config_dump('saga.invocations', '');

CREATE FUNCTION saga.invoke(key text, fn regprocedure, ctx jsonb)
RETURNS jsonb LANGUAGE c AS 'MODULE_PATHNAME', 'saga_invoke';
COMMENT ON FUNCTION saga.invoke(text, regprocedure, jsonb) IS 'run fn(ctx) once per key, in the current transaction and as the current user; a repeat returns the stored result';

CREATE FUNCTION saga.compensate(action_key text, fn regprocedure, ctx jsonb)
RETURNS jsonb LANGUAGE c AS 'MODULE_PATHNAME', 'saga_compensate';
COMMENT ON FUNCTION saga.compensate(text, regprocedure, jsonb) IS 'run fn(ctx) once if the action with this key ran here; otherwise leave a tombstone that refuses a later saga.invoke() of it, and return NULL';

-- ---------- Inbox ----------

-- Handlers: the worker calls handler(message jsonb) for every received
-- message whose topic matches, as the role that registered it.
CREATE TABLE saga.handlers (
    pattern text NOT NULL,
    prefix text,
    handler regprocedure NOT NULL,
    owner oid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, handler)
);
COMMENT ON TABLE saga.handlers IS 'inbox handlers by topic pattern (internal; use saga.handle())';
-- publish routes this database's own messages to its handlers: backends
-- cache the patterns with the subscriptions, and reread both after a change
CREATE TRIGGER handlers_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON saga.handlers
    FOR EACH STATEMENT EXECUTE FUNCTION saga.config_changed();
COMMENT ON COLUMN saga.handlers.handler IS 'the function, by OID: a function created later with the same name is not called in its place';
COMMENT ON COLUMN saga.handlers.prefix IS 'for a pattern "x.*": "x."; for "*": empty; NULL for an exact topic';

-- One row per received message id, kept after processing so that a
-- duplicate is recognised (until saga.purge removes it).
CREATE TABLE saga.inbox_messages (
    message_id uuid PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    headers jsonb,
    source text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'processed', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    received_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);
CREATE INDEX inbox_due ON saga.inbox_messages (next_attempt_at, seq) WHERE status = 'pending';
CREATE INDEX inbox_processed ON saga.inbox_messages (processed_at, message_id) WHERE status = 'processed';
COMMENT ON TABLE saga.inbox_messages IS 'messages received with saga.receive(), pending, processed or dead (internal; read saga.inbox)';
SELECT pg_catalog.pg_extension_config_dump('saga.handlers', '');
SELECT pg_catalog.pg_extension_config_dump('saga.inbox_messages', '');

CREATE VIEW saga.inbox(message_id, topic, key, source, status, received_at, processed_at,
                       attempts, next_attempt_at, last_error) AS
SELECT m.message_id, m.topic, m.key, m.source, m.status, m.received_at, m.processed_at,
       m.attempts, m.next_attempt_at, m.last_error
FROM saga.inbox_messages m;
COMMENT ON VIEW saga.inbox IS 'received messages: pending, processed by their handlers, or dead';


CREATE FUNCTION saga._handle(pattern text, prefix text, handler regprocedure, caller oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    p pg_proc;
BEGIN
    SELECT * INTO p FROM pg_proc f WHERE f.oid = handler;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'function with OID % does not exist', handler::oid USING ERRCODE = 'undefined_function';
    END IF;
    IF p.pronargs <> 1 OR p.proargtypes[0] <> 'jsonb'::regtype THEN
        RAISE EXCEPTION 'handler % must take one jsonb argument (the message)', handler
            USING ERRCODE = 'undefined_function';
    END IF;
    IF p.prokind <> 'f' OR p.proretset THEN
        RAISE EXCEPTION 'handler % is not a plain function returning one value', handler
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF p.pronamespace = pg_my_temp_schema()
       OR (SELECT n.nspname LIKE 'pg\_temp\_%' FROM pg_namespace n WHERE n.oid = p.pronamespace) THEN
        RAISE EXCEPTION 'handler % is a temporary function', handler
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A handler outlives the session that registers it.';
    END IF;
    IF NOT has_function_privilege(caller, handler, 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for function %', handler USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO saga.handlers (pattern, prefix, handler, owner)
    VALUES (pattern, prefix, handler, caller)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE NOTICE 'handler % is already registered for "%", skipping', handler, pattern;
    END IF;
END
$$;

CREATE FUNCTION saga._unhandle(pattern text, handler regprocedure, caller oid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    h saga.handlers;
BEGIN
    SELECT * INTO h FROM saga.handlers x WHERE x.pattern = _unhandle.pattern AND x.handler = handler
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT saga._may_control(caller, h.owner) THEN
        RAISE EXCEPTION 'permission denied to remove handler % for "%"', handler, pattern
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('It was registered by role %s.', pg_get_userbyid(h.owner));
    END IF;
    DELETE FROM saga.handlers x WHERE x.pattern = h.pattern AND x.handler = h.handler;
    RETURN true;
END
$$;

CREATE FUNCTION saga.receive(message_id uuid, topic text, payload jsonb, key text DEFAULT NULL,
    headers jsonb DEFAULT NULL, source text DEFAULT NULL)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'saga_receive';
CREATE FUNCTION saga.handle(topic text, handler regprocedure)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'saga_handle';
CREATE FUNCTION saga.unhandle(topic text, handler regprocedure)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'saga_unhandle';
COMMENT ON FUNCTION saga.receive(uuid, text, jsonb, text, jsonb, text) IS 'store a message for this database''s handlers in the current transaction; false if its id was received before';
COMMENT ON FUNCTION saga.handle(text, regprocedure) IS 'call handler(message jsonb) once for every received message of a topic, as the current role';
COMMENT ON FUNCTION saga.unhandle(text, regprocedure) IS 'stop calling a handler for a topic; false if it was not registered';
COMMENT ON FUNCTION saga._handle(text, text, regprocedure, oid) IS 'internal: saga.handle() as the extension owner';
COMMENT ON FUNCTION saga._unhandle(text, regprocedure, oid) IS 'internal: saga.unhandle() as the extension owner';

-- ---------- Maintenance ----------

-- Finished sagas in the order saga.purge() removes them, so that a purge
-- reads only what it deletes. Running sagas have no entry, and the updates
-- that finish a saga also change next_run_at (indexed), so no update that
-- was HOT stops being HOT.
CREATE INDEX instances_finished ON saga.instances (finished_at, id)
    WHERE status IN ('completed', 'compensated');

-- saga.purge() as the extension owner: delete what finished before
-- now() - older_than, batch_size rows per statement. Each batch starts after
-- the last row of the one before (keyset), so rows this transaction already
-- deleted are not read again. Every DELETE checks its condition again on the
-- row it deletes: a row that changed meanwhile is kept.
CREATE FUNCTION saga._purge(older_than interval, batch_size integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    cutoff timestamptz;
    total bigint := 0;
    n bigint;
    deleted bigint;
    last_at timestamptz := '-infinity';
    last_id uuid := '00000000-0000-0000-0000-000000000000';
    last_key text := '';
    last_dest text := '';
BEGIN
    BEGIN
        cutoff := now() - older_than;
    EXCEPTION WHEN datetime_field_overflow THEN
        RETURN 0;               -- before the earliest timestamp: nothing is older
    END;

    -- completed and compensated sagas with their steps (failed ones wait
    -- for an operator, running ones are never touched)
    LOOP
        WITH batch AS (
            SELECT i.id, i.finished_at FROM saga.instances i
            WHERE i.status IN ('completed', 'compensated') AND i.finished_at < cutoff
              AND (i.finished_at, i.id) > (last_at, last_id)
            ORDER BY i.finished_at, i.id LIMIT batch_size
        ), sagas AS (
            DELETE FROM saga.instances i
            WHERE i.id = ANY (ARRAY(SELECT b.id FROM batch b))
              AND i.status IN ('completed', 'compensated') AND i.finished_at < cutoff
            RETURNING i.id
        ), steps AS (
            DELETE FROM saga.instance_steps x
            WHERE x.saga_id = ANY (ARRAY(SELECT g.id FROM sagas g))
            RETURNING 1
        )
        SELECT c.n, c.deleted, l.finished_at, l.id INTO n, deleted, last_at, last_id
        FROM (SELECT (SELECT count(*) FROM batch) AS n,
                     (SELECT count(*) FROM sagas) + (SELECT count(*) FROM steps) AS deleted) c
        LEFT JOIN (SELECT b.finished_at, b.id FROM batch b
                   ORDER BY b.finished_at DESC, b.id DESC LIMIT 1) l ON true;
        total := total + deleted;
        EXIT WHEN n < batch_size;
    END LOOP;

    -- invocations: executed, compensated or tombstones, by last activity
    LOOP
        WITH batch AS (
            SELECT v.key FROM saga.invocations v
            WHERE v.key > last_key AND greatest(v.invoked_at, v.compensated_at) < cutoff
            ORDER BY v.key LIMIT batch_size
        ), gone AS (
            DELETE FROM saga.invocations v
            WHERE v.key = ANY (ARRAY(SELECT b.key FROM batch b))
              AND greatest(v.invoked_at, v.compensated_at) < cutoff
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM batch), (SELECT count(*) FROM gone), (SELECT max(b.key) FROM batch b)
        INTO n, deleted, last_key;
        total := total + deleted;
        EXIT WHEN n < batch_size;
    END LOOP;

    -- processed inbox messages (pending and dead ones stay)
    last_at := '-infinity';
    last_id := '00000000-0000-0000-0000-000000000000';
    LOOP
        WITH batch AS (
            SELECT m.message_id, m.processed_at FROM saga.inbox_messages m
            WHERE m.status = 'processed' AND m.processed_at < cutoff
              AND (m.processed_at, m.message_id) > (last_at, last_id)
            ORDER BY m.processed_at, m.message_id LIMIT batch_size
        ), gone AS (
            DELETE FROM saga.inbox_messages m
            WHERE m.message_id = ANY (ARRAY(SELECT b.message_id FROM batch b))
              AND m.status = 'processed' AND m.processed_at < cutoff
            RETURNING 1
        )
        SELECT c.n, c.deleted, l.processed_at, l.message_id INTO n, deleted, last_at, last_id
        FROM (SELECT (SELECT count(*) FROM batch) AS n, (SELECT count(*) FROM gone) AS deleted) c
        LEFT JOIN (SELECT b.processed_at, b.message_id FROM batch b
                   ORDER BY b.processed_at DESC, b.message_id DESC LIMIT 1) l ON true;
        total := total + deleted;
        EXIT WHEN n < batch_size;
    END LOOP;

    -- messages kept for saga.message() after a NOTIFY without payload (dead
    -- letters stay until redelivered or removed by an operator)
    last_at := '-infinity';
    last_id := '00000000-0000-0000-0000-000000000000';
    LOOP
        WITH batch AS (
            SELECT q.ctid AS tid, q.finished_at, q.message_id, q.destination FROM saga.queue q
            WHERE q.status = 'delivered' AND q.finished_at < cutoff
              AND (q.finished_at, q.message_id, q.destination) > (last_at, last_id, last_dest)
            ORDER BY q.finished_at, q.message_id, q.destination LIMIT batch_size
        ), gone AS (
            DELETE FROM saga.queue q
            WHERE q.ctid = ANY (ARRAY(SELECT b.tid FROM batch b))
              AND q.status = 'delivered' AND q.finished_at < cutoff
            RETURNING 1
        )
        SELECT c.n, c.deleted, l.finished_at, l.message_id, l.destination
        INTO n, deleted, last_at, last_id, last_dest
        FROM (SELECT (SELECT count(*) FROM batch) AS n, (SELECT count(*) FROM gone) AS deleted) c
        LEFT JOIN (SELECT b.finished_at, b.message_id, b.destination FROM batch b
                   ORDER BY b.finished_at DESC, b.message_id DESC, b.destination DESC LIMIT 1) l ON true;
        total := total + deleted;
        EXIT WHEN n < batch_size;
    END LOOP;

    RETURN total;
END
$$;
COMMENT ON FUNCTION saga._purge(interval, integer) IS 'internal: saga.purge() as the extension owner, batch_size rows per statement';

-- Sagas whose deadline has passed but that no wake-up will bring to the
-- worker: running ones with nothing due (or something due only later), and
-- compensating ones with nothing due and no HTTP call out. A compensation
-- waiting for its next attempt keeps its backoff. Rows the worker holds are
-- skipped: it is handling them.
CREATE FUNCTION saga._sweep_deadlines() RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH due AS (
        SELECT i.id FROM saga.instances i
        WHERE i.deadline < now()
          AND ((i.status = 'running' AND (i.next_run_at IS NULL OR i.next_run_at > now()))
               OR (i.status = 'compensating' AND i.next_run_at IS NULL AND i.request_id IS NULL))
        FOR UPDATE SKIP LOCKED
    ), woken AS (
        UPDATE saga.instances i SET next_run_at = now()
        FROM due d WHERE i.id = d.id
        RETURNING 1
    )
    SELECT count(*)::integer FROM woken
$$;
COMMENT ON FUNCTION saga._sweep_deadlines() IS 'internal (maintenance job): make sagas past their deadline due, in case a wake-up was missed; returns how many';

CREATE FUNCTION saga.purge(older_than interval DEFAULT '7 days')
RETURNS bigint LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'saga_purge';
COMMENT ON FUNCTION saga.purge(interval) IS 'delete completed and compensated sagas, invocations and kept NOTIFY messages older than older_than (failed sagas and dead letters stay); returns how many rows';

CREATE FUNCTION saga.schedule_maintenance(schedule text DEFAULT '*/10 * * * *')
RETURNS bigint LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'saga_schedule_maintenance';
COMMENT ON FUNCTION saga.schedule_maintenance(text) IS 'register (or reschedule) the pg_cron job that sweeps deadlines and runs saga.purge() in this database; returns its job id';

CREATE FUNCTION saga.unschedule_maintenance()
RETURNS boolean LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'saga_unschedule_maintenance';
COMMENT ON FUNCTION saga.unschedule_maintenance() IS 'remove the pg_cron job of saga.schedule_maintenance(); false if there was none';

-- Privileges: nothing for PUBLIC but the application API.
REVOKE ALL ON ALL TABLES IN SCHEMA saga FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA saga FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA saga FROM PUBLIC;
GRANT USAGE ON SCHEMA saga TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.publish(text, jsonb, text, jsonb, timestamptz) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.message(uuid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.worker_status() TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.define(text, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.start(text, jsonb, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.begin(text, jsonb, text, interval) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.step(uuid, text, jsonb, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.complete(uuid, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.fail(uuid, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.cancel(uuid, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.retry(uuid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.get(uuid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.wait(uuid, interval) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga._may_control(oid, oid) TO PUBLIC;
GRANT SELECT ON saga.sagas, saga.saga_steps, saga.stuck TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.invoke(text, regprocedure, jsonb) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.handle(text, regprocedure) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.unhandle(text, regprocedure) TO PUBLIC;
GRANT EXECUTE ON FUNCTION saga.compensate(text, regprocedure, jsonb) TO PUBLIC;

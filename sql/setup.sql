-- The extension installs its schema, and the worker comes up for this database.
\dx saga
SELECT count(*) > 0 AS has_tables FROM pg_tables WHERE schemaname = 'saga';
SELECT kind FROM saga.worker_status() WHERE kind = 'launcher';

-- The extension installs its schema, and the worker comes up for this database.
\dx saga
SELECT count(*) > 0 AS has_tables FROM pg_tables WHERE schemaname = 'saga';
SELECT kind FROM saga.worker_status() WHERE kind = 'launcher';

-- Used by the files after this one (they share this database):
-- try(statement): 'ok', or the error it raised without source locations.
CREATE FUNCTION public.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	detail text;
	hint text;
	ctx text;
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT,
		ctx = PG_EXCEPTION_CONTEXT;
	-- keep context lines saga added; drop the frames of this function
	ctx := regexp_replace(ctx, '(^|\n)(SQL statement|PL/pgSQL function) [^\n]*', '', 'g');
	ctx := regexp_replace(ctx, '^\n+', '');
	RETURN SQLSTATE || ': ' || SQLERRM
		|| CASE WHEN detail <> '' THEN E'\nDETAIL: ' || detail ELSE '' END
		|| CASE WHEN hint <> '' THEN E'\nHINT: ' || hint ELSE '' END
		|| CASE WHEN ctx <> '' THEN E'\nCONTEXT: ' || ctx ELSE '' END;
END $$;


-- The pipeline's mutual exclusion belongs to the pipeline. Its locks are advisory locks on fixed
-- keys (7310001 migrations, 7310002 the ingest merge, 7310003 the registries, 7310005 batch
-- ranking), and PostgreSQL lets every role call the advisory-lock functions: a consumer logged in
-- through recranker_reader could hold a key and stop ingest or ranking. The functions' EXECUTE
-- right moves from PUBLIC to the pipeline's role (the owner of schema recranker, which applies
-- the migrations), in this database only: function rights are per database, and so are advisory
-- locks. recranker_reader keeps exactly SELECT on recranker.recommendations_current.
--
-- Changing rights on pg_catalog functions takes a superuser (they belong to the bootstrap
-- superuser). Applied by another role, this changes nothing and a WARNING says so; a superuser
-- can then run this file in the same database (psql -d DB -f sql/0006_pipeline_locks.sql).
DO $$
DECLARE
    fn regprocedure;
    pipeline regrole := (SELECT nspowner::regrole FROM pg_namespace WHERE nspname = 'recranker');
    superuser boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
    left_open integer := 0;
BEGIN
    FOR fn IN
        SELECT p.oid::regprocedure
        FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND p.proname ~ '^pg_(try_)?advisory_'
        ORDER BY 1
    LOOP
        IF superuser THEN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', fn, pipeline);
        END IF;
        IF has_function_privilege('recranker_reader', fn, 'EXECUTE') THEN
            left_open := left_open + 1;
        END IF;
    END LOOP;
    IF left_open > 0 THEN
        RAISE WARNING 'recranker_reader can still take the pipeline''s advisory locks in database '
            '% (% functions open to PUBLIC): migrations ran as %, not a superuser. As a superuser, '
            'run sql/0006_pipeline_locks.sql in that database (psql -d % -f ...)',
            current_database(), left_open, current_user, current_database();
    END IF;
END
$$;

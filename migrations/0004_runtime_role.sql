-- The runtime role (SPEC §3): what the shards and the operator commands need, and nothing more.
-- A login role for DATABASE_URL is made a member of it (OPERATIONS.md, "Postgres roles"):
--   CREATE ROLE processor_app LOGIN PASSWORD '…' IN ROLE processor_runtime;
-- It may read and write rows, never create, alter or drop anything. Partitions of positions
-- need no grants of their own: rows reach them through the parent. common/privileges.py
-- lists the same grants (a test holds the two in step).

-- Roles belong to the cluster, so another database's migration may create it at the same
-- moment: the loser of that race finds it made. Without CREATEROLE the owner cannot make it,
-- and the message says what a superuser must run once.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'processor_runtime') THEN
        BEGIN
            CREATE ROLE processor_runtime NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role % may not create the role processor_runtime', current_user
                    USING HINT = 'run once as a superuser: CREATE ROLE processor_runtime NOLOGIN';
        END;
    END IF;
END $$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO processor_runtime', current_schema());
    -- Staging tables are temporary: the writer needs TEMPORARY (PUBLIC usually has it too).
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO processor_runtime', current_database());
END $$;

GRANT SELECT, INSERT ON positions TO processor_runtime;
GRANT SELECT, INSERT, UPDATE ON last_position TO processor_runtime;
-- A late fix replays a device's visits: some are deleted and written again.
GRANT SELECT, INSERT, UPDATE, DELETE ON timing_records TO processor_runtime;
-- `processor geofences import`; the trigger bumps geofence_revision as the caller.
GRANT SELECT, INSERT, UPDATE ON geofences TO processor_runtime;
GRANT SELECT, UPDATE ON geofence_revision TO processor_runtime;
-- `processor run` checks that the schema is current before it skips migrating.
GRANT SELECT ON schema_migrations TO processor_runtime;

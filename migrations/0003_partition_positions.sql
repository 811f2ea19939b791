-- processor: no-transaction
-- positions becomes range-partitioned on ts (SPEC §3), without rewriting its rows and without
-- holding an exclusive lock for more than a moment, while writers keep writing:
--   1. CHECK (ts < cutover) NOT VALID: an ACCESS EXCLUSIVE lock for a moment;
--   2. VALIDATE it: a scan under SHARE UPDATE EXCLUSIVE, which writers never wait for;
--   3. one short transaction: the table becomes positions_before_<cutover>, a partitioned
--      positions takes its place and the old table is attached to it FROM (MINVALUE) TO
--      (cutover); the validated CHECK spares ATTACH its scan;
--   4. daily partitions positions_<YYYYMMDD> for 14 days from the cutover, each created on its
--      own and attached (SHARE UPDATE EXCLUSIVE: writers keep writing). From then on partition
--      maintenance (supervisor/partitions.py) keeps them coming and applies retention.
-- The cutover is the start (UTC) of the day after tomorrow, or of the day after the newest fix
-- in last_position if that is later: every stored row lies before it, and so does every fix
-- written while this runs (at most MAX_FUTURE_S ahead of the clock, if that is under a day).
-- On a fresh install the old table is empty and the same steps give the same layout.
-- Runs outside a transaction, step by step; every step is idempotent (supervisor/migrations.py):
-- a migration interrupted anywhere is run again from the top and skips what is done.
-- Steps that need an exclusive lock wait at most 500 ms for it (the runner tries again), so
-- writers queued behind such a request never wait longer than that.

-- Step 1: the CHECK constraint, NOT VALID. Its name carries the cutover.
DO $$
DECLARE
    earlier text;
    cutover timestamptz;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'positions'::regclass) = 'p' THEN
        RETURN;  -- converted already
    END IF;
    PERFORM set_config('lock_timeout', '500ms', true);
    PERFORM set_config('TimeZone', 'UTC', true);  -- a day is 24 hours
    SELECT conname INTO earlier FROM pg_constraint
    WHERE conrelid = 'positions'::regclass AND contype = 'c' AND conname LIKE 'positions\_ts\_before\_%';
    IF earlier IS NOT NULL THEN
        -- Left by an interrupted run: kept while its cutover is more than a day ahead, else
        -- replaced, so that it never starts refusing the fixes of the day.
        IF (to_date(right(earlier, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC') > now() + interval '1 day' THEN
            RETURN;
        END IF;
        EXECUTE format('ALTER TABLE positions DROP CONSTRAINT %I', earlier);
    END IF;
    cutover := (date_trunc('day', greatest(now() + interval '1 day', (SELECT max(ts) FROM last_position))
                                  AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC';
    IF cutover > now() + interval '3 days' THEN
        RAISE WARNING 'last_position holds fixes dated up to %: positions_before_% will hold everything before %',
            (SELECT max(ts) FROM last_position), to_char(cutover AT TIME ZONE 'UTC', 'YYYYMMDD'), cutover;
    END IF;
    EXECUTE format('ALTER TABLE positions ADD CONSTRAINT %I CHECK (ts < %L) NOT VALID',
                   'positions_ts_before_' || to_char(cutover AT TIME ZONE 'UTC', 'YYYYMMDD'), cutover);
END $$;
-- processor: step
-- Step 2: validate it. Writers keep writing during the scan. Should a row lie after the cutover
-- (a fix stored by hand, unknown to last_position), the constraint is dropped again, so that
-- nothing is left behind that refuses fixes later, and step 3 stops the migration.
DO $$
DECLARE
    pending text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'positions'::regclass) = 'p' THEN
        RETURN;
    END IF;
    SELECT conname INTO pending FROM pg_constraint
    WHERE conrelid = 'positions'::regclass AND contype = 'c' AND conname LIKE 'positions\_ts\_before\_%'
      AND NOT convalidated;
    IF pending IS NULL THEN
        RETURN;  -- validated already
    END IF;
    BEGIN
        EXECUTE format('ALTER TABLE positions VALIDATE CONSTRAINT %I', pending);
    EXCEPTION WHEN check_violation THEN
        PERFORM set_config('lock_timeout', '500ms', true);
        EXECUTE format('ALTER TABLE positions DROP CONSTRAINT %I', pending);
        RAISE WARNING 'positions holds rows dated after the cutover of %', pending;
    END;
END $$;
-- processor: step
-- Step 3: the swap, in one short transaction. Privileges and the owner go over to the new table.
DO $$
DECLARE
    old_table oid := 'positions'::regclass;
    checked text;
    old_name text;
    old_key text;
    cutover timestamptz;
    grant_row record;
    views text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = old_table) = 'p' THEN
        RETURN;
    END IF;
    SELECT conname INTO checked FROM pg_constraint
    WHERE conrelid = old_table AND contype = 'c' AND conname LIKE 'positions\_ts\_before\_%' AND convalidated;
    IF checked IS NULL THEN
        RAISE EXCEPTION 'positions holds rows dated after the newest fix in last_position (stored by hand?)'
            USING HINT = 'Find them with SELECT device_id, ts FROM positions WHERE ts >= '
                         '(SELECT max(ts) FROM last_position); correct or delete them, then migrate again.';
    END IF;
    cutover := to_date(right(checked, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC';
    old_name := 'positions_before_' || right(checked, 8);
    SELECT conname INTO old_key FROM pg_constraint WHERE conrelid = old_table AND contype = 'p';
    SELECT string_agg(DISTINCT v.oid::regclass::text, ', ') INTO views
    FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
    WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = old_table AND v.oid <> old_table;
    IF views IS NOT NULL THEN
        RAISE WARNING 'views % read the old table, now %: recreate them on positions', views, old_name;
    END IF;

    PERFORM set_config('lock_timeout', '500ms', true);
    LOCK TABLE positions IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('ALTER TABLE positions RENAME TO %I', old_name);
    EXECUTE format('ALTER TABLE %I RENAME CONSTRAINT %I TO %I', old_name, old_key, old_name || '_pkey');
    EXECUTE format('CREATE TABLE positions (LIKE %I INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION '
                   'INCLUDING GENERATED INCLUDING IDENTITY INCLUDING COMMENTS) PARTITION BY RANGE (ts)', old_name);
    ALTER TABLE positions ADD PRIMARY KEY (device_id, ts);
    EXECUTE format('ALTER TABLE positions OWNER TO %I', (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = old_table));
    FOR grant_row IN
        SELECT a.grantee, a.privilege_type, a.is_grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = old_table AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON positions TO %s%s', grant_row.privilege_type,
                       CASE WHEN grant_row.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grant_row.grantee)) END,
                       CASE WHEN grant_row.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    EXECUTE format('ALTER TABLE positions ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)', old_name, cutover);
END $$;
-- processor: step
-- Step 4: 14 daily partitions from the cutover on, each made alone and then attached.
DO $$
DECLARE
    cutover timestamptz;
    day timestamptz;
    name text;
BEGIN
    PERFORM set_config('TimeZone', 'UTC', true);  -- a day is 24 hours
    SELECT to_date(right(c.relname, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC' INTO cutover
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'positions'::regclass AND c.relname LIKE 'positions\_before\_%'
    ORDER BY c.relname DESC LIMIT 1;
    FOR day IN SELECT generate_series(cutover, cutover + interval '13 days', interval '1 day') LOOP
        name := 'positions_' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(format('%I', name)) IS NOT NULL;
        EXECUTE format('CREATE TABLE %I (LIKE positions INCLUDING DEFAULTS INCLUDING STORAGE INCLUDING COMPRESSION)', name);
        EXECUTE format('ALTER TABLE positions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       name, day, day + interval '1 day');
    END LOOP;
END $$;

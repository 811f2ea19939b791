-- Geofence changes are never applied to history (SPEC §5 "Derived state is order-proof"):
-- a late fix's replay evaluates every stored fix of its stretch against the geofences the fix
-- was first derived with. So every version of every geofence is kept, by the revision it took
-- effect at, and every fix records the revision its batch derived it with
-- (shard/devices/replay.py). Fixes stored before this migration carry none: the replay evaluates
-- them with the geofences of `history_since`, the revision this migration found.

-- No import may commit between the seed below and the new triggers: its version would be missing.
LOCK TABLE geofences IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE geofence_versions (
    geofence_id bigint NOT NULL,
    revision    bigint NOT NULL,
    name        text NOT NULL,
    geometry    jsonb NOT NULL,
    radius_m    double precision,
    active      boolean NOT NULL,  -- false also from the revision that deleted the geofence
    PRIMARY KEY (geofence_id, revision)
);
INSERT INTO geofence_versions (geofence_id, revision, name, geometry, radius_m, active)
SELECT g.id, r.revision, g.name, g.geometry, g.radius_m, g.active FROM geofences g CROSS JOIN geofence_revision r;
ALTER TABLE geofence_revision ADD COLUMN history_since bigint;
UPDATE geofence_revision SET history_since = revision;

ALTER TABLE positions ADD COLUMN geofence_revision bigint;

-- The revision now moves before a statement's rows change (it moved after), so that each row's
-- version is kept under the revision its transaction commits with. The row lock on
-- geofence_revision still orders the changes as their commits.
DROP TRIGGER geofences_bump_revision ON geofences;
CREATE TRIGGER geofences_bump_revision BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON geofences
    FOR EACH STATEMENT EXECUTE FUNCTION geofences_bump_revision();

CREATE FUNCTION geofences_keep_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO geofence_versions (geofence_id, revision, name, geometry, radius_m, active)
        SELECT OLD.id, r.revision, OLD.name, OLD.geometry, OLD.radius_m, false FROM geofence_revision r
        ON CONFLICT (geofence_id, revision) DO UPDATE SET active = false;
    ELSE
        INSERT INTO geofence_versions (geofence_id, revision, name, geometry, radius_m, active)
        SELECT NEW.id, r.revision, NEW.name, NEW.geometry, NEW.radius_m, NEW.active FROM geofence_revision r
        ON CONFLICT (geofence_id, revision) DO UPDATE SET
            name = EXCLUDED.name, geometry = EXCLUDED.geometry, radius_m = EXCLUDED.radius_m, active = EXCLUDED.active;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER geofences_keep_version AFTER INSERT OR UPDATE OR DELETE ON geofences
    FOR EACH ROW EXECUTE FUNCTION geofences_keep_version();

-- TRUNCATE fires no row trigger: every geofence it removes gets its inactive version here. (A
-- BEFORE statement trigger named after geofences_bump_revision: it runs after the bump.)
CREATE FUNCTION geofences_keep_versions_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO geofence_versions (geofence_id, revision, name, geometry, radius_m, active)
    SELECT g.id, r.revision, g.name, g.geometry, g.radius_m, false FROM geofences g CROSS JOIN geofence_revision r
    ON CONFLICT (geofence_id, revision) DO UPDATE SET active = false;
    RETURN NULL;
END $$;
CREATE TRIGGER geofences_keep_versions_truncated BEFORE TRUNCATE ON geofences
    FOR EACH STATEMENT EXECUTE FUNCTION geofences_keep_versions_truncated();

-- The trigger runs as the caller (`processor geofences import`); the shards' replay reads it.
GRANT SELECT, INSERT, UPDATE ON geofence_versions TO processor_runtime;

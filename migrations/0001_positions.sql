-- Every fix, stored once per device and fix time; redeliveries collapse on the primary key.
CREATE TABLE positions (
    device_id   text COLLATE "C" NOT NULL,
    ts          timestamptz      NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    alt         real,
    speed       real,
    heading     real,
    sats        smallint,
    attributes  jsonb,
    received_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, ts)
);

-- The fix with the greatest ts per device; the upsert never lets an older fix win.
CREATE TABLE last_position (
    device_id   text COLLATE "C" PRIMARY KEY,
    ts          timestamptz      NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    alt         real,
    speed       real,
    heading     real,
    sats        smallint,
    attributes  jsonb,
    odometer_m  double precision NOT NULL DEFAULT 0,
    updated_at  timestamptz      NOT NULL DEFAULT now()
);

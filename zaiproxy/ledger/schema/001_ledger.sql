-- The usage ledger, version 1. Portable SQL: the same statements run on
-- SQLite (3.24 or later, for ON CONFLICT ... DO UPDATE) and PostgreSQL.
-- Times are Unix seconds; buckets are whole minutes or hours (UTC).

-- One row per finished request.
CREATE TABLE requests (
    request_id TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION NOT NULL,
    minute BIGINT NOT NULL,
    client TEXT NOT NULL,
    peer TEXT NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    dialect TEXT NOT NULL,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    error_type TEXT,
    zai_error TEXT,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    token_source TEXT,
    cost_usd DOUBLE PRECISION NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    ttfb_ms DOUBLE PRECISION,
    queue_wait_ms DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    zai_request_id TEXT,
    variant TEXT NOT NULL,
    instance TEXT NOT NULL
);
CREATE UNIQUE INDEX requests_by_id ON requests (request_id);
CREATE INDEX requests_by_start ON requests (started_at);

-- Per-minute and per-hour sums of the requests table, kept as rows are
-- written, so long ranges never scan it. lat_N counts requests whose
-- duration fell in the Nth latency bucket (zaiproxy.ledger.rows.LATENCY_BOUNDS).
CREATE TABLE usage_minute (
    bucket BIGINT NOT NULL,
    variant TEXT NOT NULL,
    instance TEXT NOT NULL,
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    status_class INTEGER NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    cost_input DOUBLE PRECISION NOT NULL,
    cost_output DOUBLE PRECISION NOT NULL,
    cost_cache_read DOUBLE PRECISION NOT NULL,
    cost_cache_write DOUBLE PRECISION NOT NULL,
    duration_ms BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    upstream_errors BIGINT NOT NULL,
    retries BIGINT NOT NULL,
    rejections BIGINT NOT NULL,
    lat_0 BIGINT NOT NULL, lat_1 BIGINT NOT NULL, lat_2 BIGINT NOT NULL, lat_3 BIGINT NOT NULL,
    lat_4 BIGINT NOT NULL, lat_5 BIGINT NOT NULL, lat_6 BIGINT NOT NULL, lat_7 BIGINT NOT NULL,
    lat_8 BIGINT NOT NULL, lat_9 BIGINT NOT NULL, lat_10 BIGINT NOT NULL, lat_11 BIGINT NOT NULL,
    PRIMARY KEY (bucket, variant, instance, client, model, route, status_class)
);
CREATE TABLE usage_hour (
    bucket BIGINT NOT NULL,
    variant TEXT NOT NULL,
    instance TEXT NOT NULL,
    client TEXT NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    status_class INTEGER NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    cost_input DOUBLE PRECISION NOT NULL,
    cost_output DOUBLE PRECISION NOT NULL,
    cost_cache_read DOUBLE PRECISION NOT NULL,
    cost_cache_write DOUBLE PRECISION NOT NULL,
    duration_ms BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    upstream_errors BIGINT NOT NULL,
    retries BIGINT NOT NULL,
    rejections BIGINT NOT NULL,
    lat_0 BIGINT NOT NULL, lat_1 BIGINT NOT NULL, lat_2 BIGINT NOT NULL, lat_3 BIGINT NOT NULL,
    lat_4 BIGINT NOT NULL, lat_5 BIGINT NOT NULL, lat_6 BIGINT NOT NULL, lat_7 BIGINT NOT NULL,
    lat_8 BIGINT NOT NULL, lat_9 BIGINT NOT NULL, lat_10 BIGINT NOT NULL, lat_11 BIGINT NOT NULL,
    PRIMARY KEY (bucket, variant, instance, client, model, route, status_class)
);

-- The live gauges (concurrency, the limiter, the quota), one sample a
-- minute, so the dashboard's long ranges survive a restart.
CREATE TABLE gauges_minute (
    bucket BIGINT NOT NULL,
    variant TEXT NOT NULL,
    instance TEXT NOT NULL,
    concurrent_max INTEGER NOT NULL,
    max_workers INTEGER NOT NULL,
    rate_limit_rps DOUBLE PRECISION NOT NULL,
    rate_limit_ceiling DOUBLE PRECISION NOT NULL,
    adj_increase BIGINT NOT NULL,
    adj_decrease BIGINT NOT NULL,
    quota TEXT,
    PRIMARY KEY (bucket, variant, instance)
);

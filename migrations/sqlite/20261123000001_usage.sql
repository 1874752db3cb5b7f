-- Usage store, SQLite flavour (kept equivalent to ../postgres). Times are UTC
-- milliseconds since the epoch.

CREATE TABLE usage_events (
    request_id       TEXT    PRIMARY KEY,          -- idempotent replays
    time_ms          INTEGER NOT NULL,
    namespace        TEXT    NOT NULL DEFAULT '',
    pod              TEXT    NOT NULL DEFAULT '',
    container        TEXT    NOT NULL DEFAULT '',
    source_ip        TEXT    NOT NULL,
    destination      TEXT    NOT NULL,
    api              TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    requested_model  TEXT,
    used_model       TEXT,
    input_tokens     INTEGER NOT NULL,
    output_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER,
    reasoning_tokens INTEGER,
    token_source     TEXT    NOT NULL,             -- provider | estimate | none
    status           INTEGER NOT NULL,
    outcome          TEXT    NOT NULL,
    rules            TEXT    NOT NULL DEFAULT '',  -- comma-separated rule names
    latency_ms       REAL    NOT NULL,
    ttft_ms          REAL,
    streamed         INTEGER NOT NULL
);
CREATE INDEX usage_events_time ON usage_events (time_ms);
CREATE INDEX usage_events_scope ON usage_events (namespace, pod, time_ms);
CREATE INDEX usage_events_model ON usage_events (used_model, time_ms);

CREATE TABLE budget_windows (
    scope_key     TEXT    NOT NULL,
    window_start  INTEGER NOT NULL,
    tokens_used   INTEGER NOT NULL DEFAULT 0,
    requests_used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope_key, window_start)
);

-- Rollups, kept up to date with each batch, so dashboards never scan raw events.
CREATE TABLE usage_hourly (
    bucket_ms     INTEGER NOT NULL,
    namespace     TEXT    NOT NULL,
    pod           TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, namespace, pod, model)
);
CREATE TABLE usage_daily (
    bucket_ms     INTEGER NOT NULL,
    namespace     TEXT    NOT NULL,
    pod           TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, namespace, pod, model)
);

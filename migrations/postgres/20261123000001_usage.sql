-- Usage store, PostgreSQL flavour (kept equivalent to ../sqlite). Times are UTC
-- milliseconds since the epoch, as in SQLite, so both stores answer the same queries.

CREATE TABLE usage_events (
    request_id       TEXT             PRIMARY KEY,
    time_ms          BIGINT           NOT NULL,
    namespace        TEXT             NOT NULL DEFAULT '',
    pod              TEXT             NOT NULL DEFAULT '',
    container        TEXT             NOT NULL DEFAULT '',
    source_ip        TEXT             NOT NULL,
    destination      TEXT             NOT NULL,
    api              TEXT             NOT NULL,
    endpoint         TEXT             NOT NULL,
    requested_model  TEXT,
    used_model       TEXT,
    input_tokens     BIGINT           NOT NULL,
    output_tokens    BIGINT           NOT NULL,
    cached_tokens    BIGINT,
    reasoning_tokens BIGINT,
    token_source     TEXT             NOT NULL,
    status           INTEGER          NOT NULL,
    outcome          TEXT             NOT NULL,
    rules            TEXT             NOT NULL DEFAULT '',
    latency_ms       DOUBLE PRECISION NOT NULL,
    ttft_ms          DOUBLE PRECISION,
    streamed         BOOLEAN          NOT NULL
);
CREATE INDEX usage_events_time ON usage_events (time_ms);
CREATE INDEX usage_events_scope ON usage_events (namespace, pod, time_ms);
CREATE INDEX usage_events_model ON usage_events (used_model, time_ms);

CREATE TABLE budget_windows (
    scope_key     TEXT   NOT NULL,
    window_start  BIGINT NOT NULL,
    tokens_used   BIGINT NOT NULL DEFAULT 0,
    requests_used BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope_key, window_start)
);

CREATE TABLE usage_hourly (
    bucket_ms     BIGINT NOT NULL,
    namespace     TEXT   NOT NULL,
    pod           TEXT   NOT NULL,
    model         TEXT   NOT NULL,
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (bucket_ms, namespace, pod, model)
);
CREATE TABLE usage_daily (
    bucket_ms     BIGINT NOT NULL,
    namespace     TEXT   NOT NULL,
    pod           TEXT   NOT NULL,
    model         TEXT   NOT NULL,
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (bucket_ms, namespace, pod, model)
);

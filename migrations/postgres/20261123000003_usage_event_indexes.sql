-- Every usage query reads raw events by time only (per-scope and per-model views come
-- from the rollups), and each index is one more B-tree written per row: the scope and
-- model indexes cost a measured share of the store's write time and served no query.
DROP INDEX usage_events_scope;
DROP INDEX usage_events_model;

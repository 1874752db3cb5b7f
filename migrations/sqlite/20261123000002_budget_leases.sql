-- Budget leases. With a shared store, budget_windows holds, per budget key and window,
-- how much of each limit the gateways have leased so far (spent or still held): one
-- column per measure a budget can limit. tokens_used is the total-tokens measure.
ALTER TABLE budget_windows ADD COLUMN input_tokens_used BIGINT NOT NULL DEFAULT 0;
ALTER TABLE budget_windows ADD COLUMN output_tokens_used BIGINT NOT NULL DEFAULT 0;

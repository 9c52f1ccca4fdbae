-- Stamping: secrets of a cell (generated variables, sensitive outputs) live apart from the
-- fields the API returns; jobs count every log byte ever appended so live followers (SSE)
-- know what is new even after the bounded log dropped its head.
ALTER TABLE cells ADD COLUMN secret_vars TEXT NOT NULL DEFAULT '{}';
ALTER TABLE cells ADD COLUMN secret_outputs TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN log_total BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_kind_target ON jobs(kind, target, state);

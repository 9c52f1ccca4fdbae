-- Releases: an app version and variables rolled out to cells wave by wave, gated by the
-- cells' traffic. `spec` is the request with defaults filled; `waves` each wave's cells
-- with what they ran before; `progress` where the rollout is (wave, phase, the gates'
-- tallies, the last evaluation); `decisions` every gate decision with its numbers.
CREATE TABLE releases (
    release_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    waves TEXT NOT NULL,
    progress TEXT NOT NULL,
    decisions TEXT NOT NULL,
    reason TEXT,
    job_id TEXT,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX releases_state ON releases(state, created_at);

-- Job engine v2: one lock mechanism. A job names the resources it holds (`tenant/{id}`,
-- `cell/{id}`, later `release/{id}`) when it is enqueued; they are inserted here in the
-- enqueue transaction and deleted in the transaction that ends the job, so they hold through
-- retries, backoff and waits. The primary key makes a second holder impossible on both
-- stores. This replaces the `pending_job_id` columns and the running-only unique index.
CREATE TABLE job_locks (
    resource TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    acquired_at TEXT NOT NULL
);
CREATE INDEX job_locks_job ON job_locks(job_id);

-- Locks of the jobs that were open when this migration ran.
INSERT INTO job_locks (resource, job_id, acquired_at)
    SELECT 'tenant/' || tenant_id, pending_job_id, updated_at FROM tenants WHERE pending_job_id IS NOT NULL;
INSERT INTO job_locks (resource, job_id, acquired_at)
    SELECT 'cell/' || cell_id, pending_job_id, updated_at FROM cells WHERE pending_job_id IS NOT NULL;

ALTER TABLE tenants DROP COLUMN pending_job_id;
ALTER TABLE cells DROP COLUMN pending_job_id;
DROP INDEX jobs_one_running_per_target;
-- Claims probe expired leases first: one index probe instead of a scan.
CREATE INDEX jobs_expired ON jobs(state, lease_expires_at);

-- A job's own typed state (JSON), written in the same transaction as a step's effect.
ALTER TABLE jobs ADD COLUMN job_state TEXT NOT NULL DEFAULT '{}';
-- The resources a job holds, as enqueued (kept after the locks are released, for history).
ALTER TABLE jobs ADD COLUMN locks TEXT NOT NULL DEFAULT '[]';

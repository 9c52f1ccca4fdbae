-- The claim takes queued jobs in (run_after, created_at, job_id) order and expired leases
-- in (lease_expires_at, job_id) order. Indexes on (state, run_after) and
-- (state, lease_expires_at) left the rest of the claim's order to a sort of every due job
-- that ties on run_after (a batch enqueued in one transaction shares it), so each claim
-- read the whole backlog: milliseconds per claim under 10,000 queued jobs. They also held
-- every job ever run, and every state change rewrote entries in both. Partial indexes hold
-- only the jobs a claim can take, in the claim's whole order: a claim reads only the rows
-- it takes, and a finished job leaves them for good.
DROP INDEX jobs_claim;
DROP INDEX jobs_expired;
CREATE INDEX jobs_claim ON jobs(run_after, created_at, job_id) WHERE state = 'queued';
CREATE INDEX jobs_expired ON jobs(lease_expires_at, job_id) WHERE state = 'running';

-- The claim takes due jobs in (run_after, created_at, job_id) order. An index on
-- (state, run_after) alone left the rest of that order to a sort of every due job that
-- ties on run_after (a batch enqueued in one transaction shares it), so each claim read
-- the whole backlog: milliseconds per claim under 10,000 queued jobs. With the full order
-- in the index a claim reads only the rows it takes.
DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs(state, run_after, created_at, job_id);

//! The durable job queue. Claiming is a conditional update of the runnable job that has
//! been due longest (queued and due, or running with an expired lease), so jobs that keep
//! waiting (a placement deferred until its cell is stamped) cannot starve the job they
//! wait for; on PostgreSQL the candidate row is
//! locked with `FOR UPDATE SKIP LOCKED` so replicas never wait on each other.
//!
//! One job at a time per resource: a job's locks (`job_locks`, primary key on the resource)
//! are taken in the transaction that enqueues it and released in the one that ends it, so
//! they hold through retries, backoff and waits.

use super::Backend;
use super::{fmt_time, now, Result, Store, StoreError, WriteTx};
use cellplane_api::{Job, JobState};
use sqlx::Row;

/// Log lines kept per job; older text is dropped from the front.
pub const MAX_LOG_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub job_id: &'a str,
    pub kind: &'a str,
    pub target: &'a str,
    pub payload: serde_json::Value,
    pub max_attempts: i64,
    pub correlation_id: Option<&'a str>,
    /// Resources the job holds until it ends (`tenant/{id}`, `cell/{id}`, …).
    pub locks: Vec<String>,
}

/// A job's last step, recorded with its end ([`WriteTx::end_jobs`]).
#[derive(Debug, Clone, Copy)]
pub struct LastStepRecord<'a> {
    pub step_index: i64,
    pub step: &'a str,
    /// Appended to the job's log.
    pub log: &'a str,
    pub state: &'a serde_json::Value,
}

/// How one job ends ([`WriteTx::end_jobs`]).
#[derive(Debug, Clone, Copy)]
pub struct JobEnd<'a> {
    pub job_id: &'a str,
    pub state: JobState,
    pub error: Option<&'a str>,
    pub last: Option<LastStepRecord<'a>>,
}

/// A job as the worker sees it: the wire view plus its payload and step cursor.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub job: Job,
    pub payload: serde_json::Value,
    pub step_index: i64,
    pub lease_owner: Option<String>,
    /// The job kind's own state, persisted with the job.
    pub state: serde_json::Value,
    /// The resources the job holds (or held).
    pub locks: Vec<String>,
}

fn job_from_row(row: &sqlx::any::AnyRow) -> Result<JobRow> {
    let state: String = row.try_get("state")?;
    let payload: String = row.try_get("payload")?;
    let cancel: i64 = row.try_get("cancel_requested")?;
    let job_state: String = row.try_get("job_state")?;
    let locks: String = row.try_get("locks")?;
    Ok(JobRow {
        job: Job {
            job_id: row.try_get("job_id")?,
            kind: row.try_get("kind")?,
            target: row.try_get("target")?,
            state: JobState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown job state {state:?}")))?,
            progress: row.try_get("progress")?,
            attempts: row.try_get("attempts")?,
            max_attempts: row.try_get("max_attempts")?,
            step: row.try_get("step")?,
            error: row.try_get("error")?,
            cancel_requested: cancel != 0,
            correlation_id: row.try_get("correlation_id")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        },
        payload: serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("job payload: {e}")))?,
        step_index: row.try_get("step_index")?,
        lease_owner: row.try_get("lease_owner")?,
        state: serde_json::from_str(&job_state)
            .map_err(|e| StoreError::Corrupt(format!("job state: {e}")))?,
        locks: serde_json::from_str(&locks)
            .map_err(|e| StoreError::Corrupt(format!("job locks: {e}")))?,
    })
}

impl WriteTx {
    /// Takes `resources` for `job_id`. Nothing is taken when one of them is held by another
    /// job: the error names it (and the caller's transaction is to be dropped).
    pub async fn acquire_locks(&mut self, job_id: &str, resources: &[String]) -> Result<()> {
        let ts = now();
        for r in resources {
            // `ON CONFLICT DO NOTHING` keeps the transaction usable on PostgreSQL, and waits
            // for a concurrent holder's transaction to end before deciding.
            let res = sqlx::query(
                "INSERT INTO job_locks (resource, job_id, acquired_at) VALUES ($1,$2,$3) \
                 ON CONFLICT (resource) DO NOTHING",
            )
            .bind(r)
            .bind(job_id)
            .bind(&ts)
            .execute(&mut *self.tx)
            .await?;
            if res.rows_affected() == 0 {
                let holder = self.lock_holder(r).await?.unwrap_or_default();
                if holder != job_id {
                    return Err(StoreError::Locked {
                        resource: r.clone(),
                        job_id: holder,
                    });
                }
            }
        }
        Ok(())
    }

    /// The job that holds `resource`, if any.
    pub async fn lock_holder(&mut self, resource: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT job_id FROM job_locks WHERE resource = $1")
                .bind(resource)
                .fetch_optional(&mut *self.tx)
                .await?,
        )
    }

    /// Releases every lock of `job_id`.
    pub async fn release_locks(&mut self, job_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM job_locks WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Records a step's cursor and the job's state in the caller's transaction, so a step's
    /// effect and the job's memory of it commit together. False when the lease was lost.
    pub async fn record_job_step(
        &mut self,
        id: &str,
        owner: &str,
        step_index: i64,
        step: &str,
        state: &serde_json::Value,
    ) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE jobs SET step_index = $1, step = $2, job_state = $3, updated_at = $4 \
             WHERE job_id = $5 AND lease_owner = $6 AND state = 'running'",
        )
        .bind(step_index)
        .bind(step)
        .bind(state.to_string())
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Enqueues a job and takes its locks in the caller's transaction.
    pub async fn insert_job(&mut self, j: &NewJob<'_>) -> Result<Job> {
        self.acquire_locks(j.job_id, &j.locks).await?;
        let ts = now();
        sqlx::query(
            "INSERT INTO jobs (job_id, kind, target, state, payload, max_attempts, run_after, correlation_id, created_at, updated_at, locks) \
             VALUES ($1,$2,$3,'queued',$4,$5,$6,$7,$6,$6,$8)",
        )
        .bind(j.job_id)
        .bind(j.kind)
        .bind(j.target)
        .bind(j.payload.to_string())
        .bind(j.max_attempts)
        .bind(&ts)
        .bind(j.correlation_id)
        .bind(serde_json::to_string(&j.locks).expect("strings serialize"))
        .execute(&mut *self.tx)
        .await?;
        // Idle workers on every replica wake when this transaction commits.
        self.notify(super::notify::JOBS, "").await?;
        Ok(Job {
            job_id: j.job_id.to_string(),
            kind: j.kind.to_string(),
            target: j.target.to_string(),
            state: JobState::Queued,
            progress: 0.0,
            attempts: 0,
            max_attempts: j.max_attempts,
            step: None,
            error: None,
            cancel_requested: false,
            correlation_id: j.correlation_id.map(str::to_string),
            created_at: ts.clone(),
            updated_at: ts,
            started_at: None,
            finished_at: None,
        })
    }

    pub async fn get_job_tx(&mut self, id: &str) -> Result<Option<JobRow>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Ends a job held by `owner`. Returns false when the lease was lost meanwhile.
    pub async fn finish_job(
        &mut self,
        id: &str,
        owner: &str,
        state: JobState,
        error: Option<&str>,
    ) -> Result<bool> {
        let ts = now();
        let res = sqlx::query(
            "UPDATE jobs SET state = $1, error = $2, finished_at = $3, updated_at = $3, lease_owner = NULL, \
             lease_expires_at = NULL, progress = CASE WHEN $1 = 'succeeded' THEN 1.0 ELSE progress END \
             WHERE job_id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(&ts)
        .bind(id)
        .bind(owner)
        .execute(&mut *self.tx)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Ends a job held by `owner` and records its last step when given; see
    /// [`WriteTx::end_jobs`]. Returns false, and changes nothing, when the lease was lost.
    pub async fn end_job(
        &mut self,
        id: &str,
        owner: &str,
        state: JobState,
        error: Option<&str>,
        last: Option<LastStepRecord<'_>>,
    ) -> Result<bool> {
        let ended = self
            .end_jobs(
                owner,
                &[JobEnd {
                    job_id: id,
                    state,
                    error,
                    last,
                }],
            )
            .await?;
        Ok(!ended.is_empty())
    }

    /// Ends the jobs `ends` held by `owner`, each with its last step when given (log line,
    /// cursor and state), in one statement; returns the ids of those it ended. A job whose
    /// lease was lost meanwhile is left as it is. The jobs' locks stay until
    /// [`WriteTx::release_locks_and_claim`] in the same transaction.
    pub async fn end_jobs(&mut self, owner: &str, ends: &[JobEnd<'_>]) -> Result<Vec<String>> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        const COLS: usize = 9;
        let mut rows = String::new();
        for r in 0..ends.len() {
            let b = 3 + r * COLS;
            if r > 0 {
                rows.push(',');
            }
            rows.push_str(&format!(
                "(CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS BIGINT), \
                 CAST(${} AS BIGINT), CAST(${} AS TEXT), CAST(${} AS TEXT), CAST(${} AS BIGINT), \
                 CAST(${} AS TEXT))",
                b,
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8
            ));
        }
        let sql = format!(
            "WITH v(job_id, state, error, stepped, step_index, step, log_append, log_len, job_state) AS (VALUES {rows}) \
             UPDATE jobs SET state = v.state, error = v.error, finished_at = $2, updated_at = $2, \
             lease_owner = NULL, lease_expires_at = NULL, \
             progress = CASE WHEN v.state = 'succeeded' THEN 1.0 ELSE jobs.progress END, \
             step_index = CASE WHEN v.stepped = 1 THEN v.step_index ELSE jobs.step_index END, \
             step = CASE WHEN v.stepped = 1 THEN v.step ELSE jobs.step END, \
             log = CASE WHEN v.stepped = 1 THEN jobs.log || v.log_append ELSE jobs.log END, \
             log_total = jobs.log_total + CASE WHEN v.stepped = 1 THEN v.log_len ELSE 0 END, \
             job_state = CASE WHEN v.stepped = 1 THEN v.job_state ELSE jobs.job_state END \
             FROM v WHERE jobs.job_id = v.job_id AND jobs.lease_owner = $1 AND jobs.state = 'running' \
             RETURNING jobs.job_id"
        );
        let mut q = sqlx::query(&sql).bind(owner).bind(now());
        for e in ends {
            q = q
                .bind(e.job_id)
                .bind(e.state.as_str())
                .bind(e.error)
                .bind(e.last.is_some() as i64)
                .bind(e.last.map(|l| l.step_index).unwrap_or(0))
                .bind(e.last.map(|l| l.step))
                .bind(e.last.map(|l| l.log))
                .bind(e.last.map(|l| l.log.len() as i64).unwrap_or(0))
                .bind(e.last.map(|l| l.state.to_string()));
        }
        let rows = q.fetch_all(&mut *self.tx).await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(Into::into))
            .collect()
    }

    /// Releases the locks of the ended jobs `ended` and claims up to `n` next jobs for
    /// `owner` (in [`Store::claim_job`]'s order): one statement on PostgreSQL (a
    /// data-modifying `WITH`), two on SQLite.
    pub async fn release_locks_and_claim(
        &mut self,
        ended: &[&str],
        owner: &str,
        lease_ms: i64,
        n: usize,
    ) -> Result<Vec<JobRow>> {
        if n == 0 {
            for id in ended {
                self.release_locks(id).await?;
            }
            return Ok(Vec::new());
        }
        let release = match self.backend {
            Backend::Postgres if !ended.is_empty() => {
                let ids: Vec<String> = (0..ended.len()).map(|i| format!("${}", 4 + i)).collect();
                format!(
                    "released AS (DELETE FROM job_locks WHERE job_id IN ({})), ",
                    ids.join(",")
                )
            }
            Backend::Postgres => String::new(),
            Backend::Sqlite => {
                if !ended.is_empty() {
                    let ids: Vec<String> =
                        (0..ended.len()).map(|i| format!("${}", 1 + i)).collect();
                    let sql = format!("DELETE FROM job_locks WHERE job_id IN ({})", ids.join(","));
                    let mut q = sqlx::query(&sql);
                    for id in ended {
                        q = q.bind(*id);
                    }
                    q.execute(&mut *self.tx).await?;
                }
                String::new()
            }
        };
        let sql = claim_sql(self.backend, lease_ms, &release);
        let mut q = sqlx::query(&sql).bind(owner).bind(now()).bind(n as i64);
        if self.backend == Backend::Postgres {
            for id in ended {
                q = q.bind(*id);
            }
        }
        let rows = q.fetch_all(&mut *self.tx).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Cancels a queued job at once; a running one is flagged for its worker.
    pub async fn request_cancel(&mut self, id: &str) -> Result<Option<JobState>> {
        let ts = now();
        let res = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = $1, updated_at = $1, \
             error = 'cancelled before it started' WHERE job_id = $2 AND state = 'queued'",
        )
        .bind(&ts)
        .bind(id)
        .execute(&mut *self.tx)
        .await?;
        if res.rows_affected() == 1 {
            return Ok(Some(JobState::Cancelled));
        }
        sqlx::query("UPDATE jobs SET cancel_requested = 1, updated_at = $1 WHERE job_id = $2 AND state = 'running'")
            .bind(&ts)
            .bind(id)
            .execute(&mut *self.tx)
            .await?;
        Ok(self.get_job_tx(id).await?.map(|j| j.job.state))
    }
}

impl Store {
    /// Claims the oldest runnable job for `owner` with a lease of `lease_ms` (negative in
    /// tests: a lease already expired). Lease expiry is judged by the database clock, so
    /// replicas whose clocks disagree still agree on whose lease has run out.
    pub async fn claim_job(&self, owner: &str, lease_ms: i64) -> Result<Option<JobRow>> {
        let sql = claim_sql(self.backend, lease_ms, "");
        let _guard = self.lock_writer().await;
        let row = sqlx::query(&sql)
            .bind(owner)
            .bind(now())
            .bind(1i64)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Extends the lease by `lease_ms` from now (database clock); returns the cancel flag,
    /// or None when the lease is lost.
    pub async fn renew_lease(&self, id: &str, owner: &str, lease_ms: i64) -> Result<Option<bool>> {
        let until = self.backend.now_sql(lease_ms);
        let _guard = self.lock_writer().await;
        let row = sqlx::query(&format!(
            "UPDATE jobs SET lease_expires_at = {until} WHERE job_id = $1 AND lease_owner = $2 AND state = 'running' \
             RETURNING cancel_requested"
        ))
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let c: i64 = r.try_get("cancel_requested")?;
                Ok(Some(c != 0))
            }
        }
    }

    /// Records progress (never lower than before), the current step, log text and, when
    /// given, the step cursor and the job's state, for a job held by `owner`.
    #[allow(clippy::too_many_arguments)]
    pub async fn job_progress(
        &self,
        id: &str,
        owner: &str,
        progress: f64,
        step_index: Option<i64>,
        step: &str,
        log_append: &str,
        state: Option<&serde_json::Value>,
    ) -> Result<bool> {
        let _guard = self.lock_writer().await;
        let mut tx = self.pool.begin().await?;
        let log: Option<String> =
            sqlx::query_scalar("SELECT log FROM jobs WHERE job_id = $1 AND lease_owner = $2")
                .bind(id)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(mut log) = log else {
            return Ok(false);
        };
        log.push_str(log_append);
        let log = bound_log(log);
        sqlx::query(
            "UPDATE jobs SET progress = CASE WHEN $1 > progress THEN $1 ELSE progress END, \
             step_index = COALESCE($2, step_index), step = $3, log = $4, updated_at = $5, \
             log_total = log_total + $8, job_state = COALESCE($9, job_state) \
             WHERE job_id = $6 AND lease_owner = $7",
        )
        .bind(progress.clamp(0.0, 1.0))
        .bind(step_index)
        .bind(step)
        .bind(&log)
        .bind(now())
        .bind(id)
        .bind(owner)
        .bind(log_append.len() as i64)
        .bind(state.map(|s| s.to_string()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A job with its bounded log and the number of log bytes ever appended, for live
    /// followers: the bytes appended since they last looked are the log's tail.
    pub async fn job_with_log(&self, id: &str) -> Result<Option<(JobRow, String, i64)>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let job = job_from_row(&r)?;
                let log: String = r.try_get("log")?;
                let total: i64 = r.try_get("log_total")?;
                Ok(Some((job, log, total)))
            }
        }
    }

    /// Puts a failed attempt back in the queue to run after `run_after`.
    pub async fn requeue_job(
        &self,
        id: &str,
        owner: &str,
        error: &str,
        run_after: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let _guard = self.lock_writer().await;
        let res = sqlx::query(
            "UPDATE jobs SET state = 'queued', error = $1, run_after = $2, lease_owner = NULL, lease_expires_at = NULL, \
             updated_at = $3 WHERE job_id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(error)
        .bind(fmt_time(run_after))
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Puts a job that waits on something slow back in the queue without spending an
    /// attempt; `note` is logged once per distinct reason.
    pub async fn defer_job(
        &self,
        id: &str,
        owner: &str,
        note: &str,
        run_after: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let _guard = self.lock_writer().await;
        let mut tx = self.pool.begin().await?;
        let log: Option<String> =
            sqlx::query_scalar("SELECT log FROM jobs WHERE job_id = $1 AND lease_owner = $2")
                .bind(id)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(mut log) = log else {
            return Ok(false);
        };
        let line = format!("waiting: {note}\n");
        if !log.ends_with(&line) {
            log.push_str(&format!("{} {line}", now()));
        }
        let res = sqlx::query(
            "UPDATE jobs SET state = 'queued', run_after = $1, lease_owner = NULL, lease_expires_at = NULL, \
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, log = $2, updated_at = $3 \
             WHERE job_id = $4 AND lease_owner = $5 AND state = 'running'",
        )
        .bind(fmt_time(run_after))
        .bind(bound_log(log))
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRow>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub async fn job_log(&self, id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT log FROM jobs WHERE job_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn list_jobs(
        &self,
        target: Option<&str>,
        state: Option<&str>,
        target_prefix: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        let mut sql = String::from("SELECT * FROM jobs WHERE job_id > $1");
        let mut binds: Vec<String> = vec![after.to_string()];
        if let Some(t) = target {
            binds.push(t.to_string());
            sql.push_str(&format!(" AND target = ${}", binds.len()));
        }
        if let Some(s) = state {
            binds.push(s.to_string());
            sql.push_str(&format!(" AND state = ${}", binds.len()));
        }
        if let Some(p) = target_prefix {
            binds.push(p.to_string());
            sql.push_str(&format!(" AND target = ${}", binds.len()));
        }
        sql.push_str(&format!(" ORDER BY job_id LIMIT ${}", binds.len() + 1));
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Number of jobs per state, for `/metrics`.
    pub async fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }
}

/// The claim statement (constants, never input): claims up to `$3` jobs for `$1` (`$2` is
/// the caller's time, for `run_after`). A claim looks first for jobs whose holder died (their
/// lease ran out, by the database clock), then for the queued jobs due longest; each is one
/// probe of its own index (an `OR` of the two conditions in one probe would scan the table).
/// `with` is prepended to the statement's `WITH` list (a lock release on PostgreSQL).
fn claim_sql(backend: Backend, lease_ms: i64, with: &str) -> String {
    let lock = match backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let db_now = backend.now_sql(0);
    let until = backend.now_sql(lease_ms);
    let expired = format!("state = 'running' AND lease_expires_at < {db_now}");
    let due = "state = 'queued' AND run_after <= $2";
    format!(
        "WITH {with}\
         expired AS (SELECT job_id FROM jobs WHERE {expired} ORDER BY lease_expires_at, job_id LIMIT $3{lock}), \
         due AS (SELECT job_id FROM jobs WHERE {due} ORDER BY run_after, created_at, job_id LIMIT $3{lock}) \
         UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = {until}, attempts = attempts + 1, \
         started_at = COALESCE(started_at, $2), updated_at = $2 \
         WHERE job_id IN (SELECT job_id FROM expired UNION ALL SELECT job_id FROM due LIMIT $3) \
         AND (({expired}) OR ({due})) RETURNING *"
    )
}

fn bound_log(mut log: String) -> String {
    if log.len() <= MAX_LOG_BYTES {
        return log;
    }
    let mut cut = log.len() - MAX_LOG_BYTES;
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    // Start at a line boundary so the first kept line is whole.
    if let Some(nl) = log[cut..].find('\n') {
        cut += nl + 1;
    }
    log.replace_range(..cut, "[earlier log lines dropped]\n");
    log
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_is_bounded_at_line_start() {
        let line = "0123456789abcdef0123456789abcdef0123456789abcdef012345678\n";
        let log = line.repeat(5000);
        let b = super::bound_log(log);
        assert!(b.len() <= super::MAX_LOG_BYTES + 40);
        assert!(b.starts_with("[earlier log lines dropped]\n0123"));
    }
}

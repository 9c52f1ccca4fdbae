//! Cross-replica wake-ups. On PostgreSQL a write announces what it changed with
//! `pg_notify` inside its transaction (delivered on commit, dropped on rollback) and every
//! replica listens; on SQLite there is one process and the in-process signals suffice.

use super::{Backend, Result, Store, WriteTx};
use tokio_util::sync::CancellationToken;

/// A job was enqueued: idle workers look for work.
pub const JOBS: &str = "cellplane_jobs";
/// The routing revision moved; the payload is the new revision.
pub const ROUTES: &str = "cellplane_routes";

/// What a replica heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Jobs,
    Routes(i64),
    /// The listener (re)connected: anything may have changed meanwhile.
    Resync,
}

impl WriteTx {
    /// Announces a change to every replica when this transaction commits (PostgreSQL only).
    pub async fn notify(&mut self, channel: &str, payload: &str) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(())
    }
}

impl Store {
    /// Listens for changes committed by any replica and hands them to `on_change` until
    /// `stop`; reconnects with a capped backoff. Returns None on SQLite.
    pub fn spawn_listener<F>(
        &self,
        stop: CancellationToken,
        on_change: F,
    ) -> Option<tokio::task::JoinHandle<()>>
    where
        F: Fn(Change) + Send + Sync + 'static,
    {
        let url = self.pg_url.clone()?;
        Some(tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(100);
            while !stop.is_cancelled() {
                match listen(&url, &stop, &on_change).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                            "change listener lost its connection");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        }))
    }
}

async fn listen<F: Fn(Change)>(url: &str, stop: &CancellationToken, on_change: &F) -> Result<()> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen_all([JOBS, ROUTES]).await?;
    on_change(Change::Resync);
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            n = listener.recv() => n?,
        };
        match n.channel() {
            JOBS => on_change(Change::Jobs),
            ROUTES => {
                if let Ok(rev) = n.payload().parse() {
                    on_change(Change::Routes(rev));
                }
            }
            _ => {}
        }
    }
}

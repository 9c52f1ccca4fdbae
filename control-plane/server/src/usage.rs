//! Usage metering on the control plane: checks the batches routers send with their
//! heartbeats (applied by the routing service, once per batch id), and answers
//! `GET /v1/usage` from the minute rollups. The hourly `dev.cellplane.usage.v1` events are
//! the usage controller's (`controllers/usage.rs`).

use crate::error::{invalid, Result, ServiceError};
use crate::persistence::{self, Store};
use cellplane_api::{FieldError, UsageBatch, UsagePoint, UsageReport, METERS};
use chrono::{DateTime, Duration, DurationRound, Utc};
use std::collections::BTreeMap;

/// Most batches one heartbeat carries, and records in all of them.
const MAX_BATCHES: usize = 50;
const MAX_RECORDS: usize = 50_000;
/// No count reaches this (2^53: exact in every JSON reader).
const MAX_AMOUNT: u64 = 1 << 53;

pub fn validate_batches(batches: &[UsageBatch]) -> Result<()> {
    let mut errors: Vec<FieldError> = Vec::new();
    let err = |errors: &mut Vec<FieldError>, field: String, message: String| {
        errors.push(FieldError { field, message })
    };
    if batches.len() > MAX_BATCHES {
        err(
            &mut errors,
            "usage".into(),
            format!("at most {MAX_BATCHES} batches per heartbeat"),
        );
    }
    let total: usize = batches.iter().map(|b| b.records.len()).sum();
    if total > MAX_RECORDS {
        err(
            &mut errors,
            "usage".into(),
            format!("at most {MAX_RECORDS} records per heartbeat"),
        );
    }
    for (i, b) in batches.iter().enumerate() {
        if b.batch_id.is_empty()
            || b.batch_id.len() > 64
            || !b
                .batch_id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            err(
                &mut errors,
                format!("usage[{i}].batch_id"),
                "1 to 64 letters, digits or dashes".into(),
            );
        }
        for (j, r) in b.records.iter().enumerate() {
            let f = |k: &str| format!("usage[{i}].records[{j}].{k}");
            if cellplane_api::validate_id(&r.tenant_id).is_err() {
                err(&mut errors, f("tenant_id"), "is not a tenant id".into());
            }
            if cellplane_api::validate_id(&r.env).is_err() {
                err(&mut errors, f("env"), "is not an environment name".into());
            }
            if parse_minute(&r.minute).is_none() {
                err(
                    &mut errors,
                    f("minute"),
                    "must be an RFC 3339 minute such as 2026-12-04T10:15:00Z".into(),
                );
            }
            for (k, v) in [
                ("requests", r.requests),
                ("request_bytes", r.request_bytes),
                ("response_bytes", r.response_bytes),
                ("units", r.units),
            ] {
                if v >= MAX_AMOUNT {
                    err(&mut errors, f(k), format!("must be below {MAX_AMOUNT}"));
                }
            }
        }
        if errors.len() > 20 {
            break;
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ServiceError::Validation(errors))
    }
}

fn parse_minute(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
    (t.duration_trunc(Duration::minutes(1)).ok()? == t).then_some(t)
}

/// A minute as the store keeps it (fixed width, comparable as text).
fn normalize(s: &str) -> String {
    parse_minute(s)
        .map(persistence::fmt_time)
        .unwrap_or_default()
}

/// Minute text of a router's record, as stored.
pub fn stored_minute(s: &str) -> String {
    normalize(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(Self::Minute),
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
    fn step(self) -> Duration {
        match self {
            Self::Minute => Duration::minutes(1),
            Self::Hour => Duration::hours(1),
            Self::Day => Duration::days(1),
        }
    }
}

/// What `GET /v1/usage` asks.
pub struct UsageQuery<'a> {
    pub tenant_id: Option<&'a str>,
    pub env: Option<&'a str>,
    pub meter: Option<&'a str>,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub granularity: Option<&'a str>,
}

/// Most minute rows one answer sums.
const MAX_ROWS: i64 = 200_000;

pub async fn report(store: &Store, q: UsageQuery<'_>) -> Result<UsageReport> {
    let g = match q.granularity {
        None => Granularity::Hour,
        Some(s) => Granularity::parse(s)
            .ok_or_else(|| invalid("granularity", "must be minute, hour or day"))?,
    };
    if let Some(m) = q.meter {
        if !METERS.contains(&m) {
            return Err(invalid(
                "meter",
                format!("must be one of {}", METERS.join(", ")),
            ));
        }
    }
    let time = |field: &str, v: &str| {
        DateTime::parse_from_rfc3339(v)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| invalid(field, format!("{v:?} is not an RFC 3339 time")))
    };
    let to = match q.to {
        Some(v) => time("to", v)?,
        None => Utc::now(),
    };
    let from = match q.from {
        Some(v) => time("from", v)?,
        None => to - Duration::days(1),
    };
    if from >= to {
        return Err(invalid("from", "must be before to"));
    }
    // Periods start on their boundary: `from` is rounded down to one.
    let from = from.duration_trunc(g.step()).unwrap_or(from);
    if g == Granularity::Minute && to - from > Duration::days(7) {
        return Err(invalid("from", "minute granularity covers at most 7 days"));
    }
    let rows = store
        .usage_rows(
            q.tenant_id,
            q.env,
            q.meter,
            &persistence::fmt_time(from),
            &persistence::fmt_time(to),
            MAX_ROWS + 1,
        )
        .await?;
    if rows.len() as i64 > MAX_ROWS {
        return Err(invalid(
            "from",
            "the range holds too many rows: narrow it, or name a tenant or meter",
        ));
    }
    let mut sums: BTreeMap<(String, String, String, DateTime<Utc>), u64> = BTreeMap::new();
    for r in rows {
        let Some(t) = persistence::parse_time(&r.minute) else {
            continue;
        };
        let start = t.duration_trunc(g.step()).unwrap_or(t);
        *sums
            .entry((r.tenant_id, r.env, r.meter, start))
            .or_default() += r.amount.max(0) as u64;
    }
    Ok(UsageReport {
        granularity: g.as_str().into(),
        from: persistence::fmt_time(from),
        to: persistence::fmt_time(to),
        items: sums
            .into_iter()
            .map(|((tenant_id, env, meter, start), amount)| UsagePoint {
                tenant_id,
                env,
                meter,
                start: persistence::fmt_time(start),
                amount,
            })
            .collect(),
    })
}

//! Usage metering: routers report counts per tenant environment and minute with their
//! heartbeats, in batches the control plane applies once each; `GET /v1/usage` reads the
//! rollups.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The meters, as named in `GET /v1/usage?meter=` and in `dev.cellplane.usage.v1` events.
pub const METERS: [&str; 4] = ["requests", "request_bytes", "response_bytes", "units"];

/// One tenant environment's counts in one minute, as a router reports them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UsageRecord {
    pub tenant_id: String,
    pub env: String,
    /// The minute's start, RFC 3339 with zero seconds (`2026-12-04T10:15:00Z`).
    pub minute: String,
    pub requests: u64,
    /// Request body bytes forwarded to the cell.
    pub request_bytes: u64,
    /// Response body bytes relayed from the cell.
    pub response_bytes: u64,
    /// Application units the cell reported in `X-Usage-Units`.
    pub units: u64,
}

/// A batch of counts with the id a router gave it once: applied at most once, whatever
/// the number of heartbeats that carry it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    #[schema(max_length = 64)]
    pub batch_id: String,
    pub records: Vec<UsageRecord>,
}

/// One point of `GET /v1/usage`: a meter's total for a tenant environment over one
/// period (`granularity`) starting at `start`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct UsagePoint {
    pub tenant_id: String,
    pub env: String,
    pub meter: String,
    pub start: String,
    pub amount: u64,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct UsageReport {
    pub granularity: String,
    pub from: String,
    pub to: String,
    pub items: Vec<UsagePoint>,
}

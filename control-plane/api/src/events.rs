//! The public event schema: every event the control plane publishes (the pull API
//! `GET /v1/events`, later webhooks) is a CloudEvents 1.0 JSON envelope ([`Event`]) whose
//! `type` is one of [`EventType`], each with a versioned `data` payload documented in
//! `docs/events.md`. Internal audit payloads never travel here: a new field in one does not
//! change this contract, and a breaking change of a payload gets a new `.vN` type.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A published event: the CloudEvents 1.0 JSON envelope plus two extension attributes,
/// `correlationid` and `seq` (the audit sequence number, increasing: the pull API's cursor
/// and a receiver's ordering key).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per event; the same across retries and replays (receivers dedupe on it).
    pub id: String,
    /// One of the documented event types, e.g. `dev.cellplane.tenancy.activated.v1`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The control plane that published it (`events.source` in the configuration).
    pub source: String,
    /// What the event is about: `tenant/{id}`, `cell/{id}`, `organization/{id}` or
    /// `webhook/{id}`.
    pub subject: String,
    /// When the change committed (RFC 3339, UTC).
    pub time: String,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The type's versioned payload (see `docs/events.md`).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// The correlation id of the request or job that made the change.
    pub correlationid: Option<String>,
    /// The audit sequence number of the change.
    pub seq: i64,
}

macro_rules! event_types {
    ($($variant:ident => $name:literal,)*) => {
        /// Every public event type.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $($variant,)*
        }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)*
                }
            }

            pub fn parse(s: &str) -> Option<EventType> {
                match s {
                    $($name => Some(EventType::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

event_types! {
    OrganizationCreated => "dev.cellplane.organization.created.v1",
    TenantCreated => "dev.cellplane.tenancy.created.v1",
    TenantUpdated => "dev.cellplane.tenancy.updated.v1",
    TenantEnvironmentAdded => "dev.cellplane.tenancy.environment_added.v1",
    TenantActivated => "dev.cellplane.tenancy.activated.v1",
    TenantSuspended => "dev.cellplane.tenancy.suspended.v1",
    TenantResumed => "dev.cellplane.tenancy.resumed.v1",
    TenantArchived => "dev.cellplane.tenancy.archived.v1",
    TenantDeleted => "dev.cellplane.tenancy.deleted.v1",
    TenantTransitionFailed => "dev.cellplane.tenancy.transition_failed.v1",
    TenantTransitionCancelled => "dev.cellplane.tenancy.transition_cancelled.v1",
    CellRegistered => "dev.cellplane.cell.registered.v1",
    CellStamped => "dev.cellplane.cell.stamped.v1",
    CellApplied => "dev.cellplane.cell.applied.v1",
    CellDestroyed => "dev.cellplane.cell.destroyed.v1",
    CellJobFailed => "dev.cellplane.cell.job_failed.v1",
    CellDrifted => "dev.cellplane.cell.drifted.v1",
    CellDraining => "dev.cellplane.cell.draining.v1",
    CellDrained => "dev.cellplane.cell.drained.v1",
    TenantMoved => "dev.cellplane.tenancy.moved.v1",
    TenantMoveRolledBack => "dev.cellplane.tenancy.move_rolled_back.v1",
    WebhookDisabled => "dev.cellplane.webhook.disabled.v1",
    WebhookRecovered => "dev.cellplane.webhook.recovered.v1",
    UsageReported => "dev.cellplane.usage.v1",
    ReleaseWaveStarted => "dev.cellplane.release.wave_started.v1",
    ReleasePaused => "dev.cellplane.release.paused.v1",
    ReleaseGateFailed => "dev.cellplane.release.gate_failed.v1",
    ReleaseHalted => "dev.cellplane.release.halted.v1",
    ReleaseRolledBack => "dev.cellplane.release.rolled_back.v1",
    ReleaseSucceeded => "dev.cellplane.release.succeeded.v1",
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_versioned_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for t in EventType::ALL {
            assert!(seen.insert(t.as_str()), "{t} twice");
            assert!(t.as_str().starts_with("dev.cellplane."), "{t}");
            assert!(t.as_str().ends_with(".v1"), "{t}");
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
        }
        assert_eq!(EventType::parse("dev.cellplane.nope.v1"), None);
    }
}

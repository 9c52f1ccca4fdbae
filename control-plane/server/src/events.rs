//! Internal audit records → public events. The audit trail keeps what the control plane
//! needs to explain itself (job ids, revisions, released capacity); consumers get
//! [`cellplane_api::Event`]s whose `data` is built here field by field, so nothing internal
//! leaks into the public contract. Records with no public type (route revisions, job
//! requests, token changes, placement decisions) are not published. Pure: no I/O.

use crate::persistence::OutboxRow;
use cellplane_api::{Event, EventType, LifecycleAction};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The cell actions whose failure is published as `cell.job_failed`.
const CELL_VERBS: [&str; 4] = ["stamp", "apply", "destroy", "plan"];

/// Every internal event type that is published, with its public type.
fn table() -> &'static BTreeMap<String, EventType> {
    static TABLE: OnceLock<BTreeMap<String, EventType>> = OnceLock::new();
    TABLE.get_or_init(|| {
        use EventType::*;
        let mut m: BTreeMap<String, EventType> = [
            ("TENANCY_ORGANIZATION_CREATED", OrganizationCreated),
            ("TENANCY_CREATED", TenantCreated),
            ("TENANCY_UPDATED", TenantUpdated),
            ("TENANCY_ENVIRONMENT_CREATED", TenantEnvironmentAdded),
            ("TENANCY_ACTIVATED", TenantActivated),
            ("TENANCY_SUSPENDED", TenantSuspended),
            ("TENANCY_RESUMED", TenantResumed),
            ("TENANCY_ARCHIVED", TenantArchived),
            ("TENANCY_DELETED", TenantDeleted),
            ("CELL_REGISTERED", CellRegistered),
            ("CELL_STAMPED", CellStamped),
            ("CELL_APPLIED", CellApplied),
            ("CELL_DESTROYED", CellDestroyed),
            ("CELL_DRIFTED", CellDrifted),
            ("CELL_DRAINING", CellDraining),
            ("CELL_DRAINED", CellDrained),
            ("TENANCY_MOVED", TenantMoved),
            ("TENANCY_MOVE_ROLLED_BACK", TenantMoveRolledBack),
            ("WEBHOOK_DISABLED", WebhookDisabled),
            ("WEBHOOK_RECOVERED", WebhookRecovered),
            ("USAGE_REPORTED", UsageReported),
            ("RELEASE_WAVE_STARTED", ReleaseWaveStarted),
            ("RELEASE_WAVE_AWAITING_APPROVAL", ReleasePaused),
            ("RELEASE_GATE_INCONCLUSIVE", ReleasePaused),
            ("RELEASE_WAVE_REFUSED", ReleasePaused),
            ("RELEASE_CELL_FAILED", ReleasePaused),
            ("RELEASE_GATE_FAILED", ReleaseGateFailed),
            ("RELEASE_HALTED", ReleaseHalted),
            ("RELEASE_ROLLBACK_FAILED", ReleaseHalted),
            ("RELEASE_ROLLED_BACK", ReleaseRolledBack),
            ("RELEASE_ABORTED", ReleaseRolledBack),
            ("RELEASE_SUCCEEDED", ReleaseSucceeded),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for a in LifecycleAction::ALL {
            let a = a.as_str().to_uppercase();
            m.insert(format!("TENANCY_{a}_FAILED"), TenantTransitionFailed);
            m.insert(format!("TENANCY_{a}_CANCELLED"), TenantTransitionCancelled);
        }
        for v in CELL_VERBS {
            m.insert(format!("CELL_{}_FAILED", v.to_uppercase()), CellJobFailed);
        }
        m
    })
}

/// The public type of an internal audit event type, if it is published.
pub fn public_type(internal: &str) -> Option<EventType> {
    table().get(internal).copied()
}

/// The internal audit event types published as one of `types` (all published ones when
/// `types` is empty): what the store filters on.
pub fn internal_types(types: &[EventType]) -> Vec<&'static str> {
    table()
        .iter()
        .filter(|(_, t)| types.is_empty() || types.contains(t))
        .map(|(k, _)| k.as_str())
        .collect()
}

/// The public event of an outbox record, or none when its type is not published.
pub fn to_public(row: &OutboxRow, source: &str) -> Option<Event> {
    let t = public_type(&row.event_type)?;
    let p = &row.payload;
    let id_of = |prefix: &str| {
        row.subject
            .strip_prefix(prefix)
            .map(|s| Value::String(s.to_string()))
            .unwrap_or(Value::Null)
    };
    let tenant = || id_of("tenant/");
    let cell = || id_of("cell/");
    let field = |k: &str| p.get(k).cloned().unwrap_or(Value::Null);
    // The lifecycle action of `TENANCY_<ACTION>_FAILED|CANCELLED`.
    let action = || {
        row.event_type
            .strip_prefix("TENANCY_")
            .and_then(|s| s.rsplit_once('_'))
            .map(|(a, _)| Value::String(a.to_lowercase()))
            .unwrap_or(Value::Null)
    };
    let data = match t {
        EventType::OrganizationCreated => json!({
            "organization_id": field("organization_id"),
            "name": field("name"),
        }),
        EventType::TenantCreated => json!({
            "tenant_id": tenant(),
            "organization_id": field("organization_id"),
            "profile": field("profile"),
            "region": field("region"),
        }),
        EventType::TenantUpdated => {
            let fields: Vec<Value> = match p.get("changes") {
                Some(Value::Object(m)) => m
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, _)| Value::String(k.clone()))
                    .collect(),
                _ => Vec::new(),
            };
            json!({"tenant_id": tenant(), "fields": fields, "version": field("version")})
        }
        EventType::TenantEnvironmentAdded => json!({
            "tenant_id": tenant(),
            "env": field("env"),
            "region": field("region"),
        }),
        EventType::TenantActivated
        | EventType::TenantSuspended
        | EventType::TenantResumed
        | EventType::TenantArchived
        | EventType::TenantDeleted => json!({"tenant_id": tenant(), "state": field("state")}),
        EventType::TenantTransitionFailed => json!({
            "tenant_id": tenant(),
            "action": action(),
            "error": field("error"),
        }),
        EventType::TenantTransitionCancelled => {
            json!({"tenant_id": tenant(), "action": action()})
        }
        EventType::CellRegistered => json!({
            "cell_id": cell(),
            "region": field("region"),
            "tier": field("tier"),
            "template": field("template"),
        }),
        EventType::CellStamped | EventType::CellApplied | EventType::CellDestroyed => {
            json!({"cell_id": cell(), "state": field("state")})
        }
        EventType::CellJobFailed => {
            let verb = row
                .event_type
                .strip_prefix("CELL_")
                .and_then(|s| s.strip_suffix("_FAILED"))
                .map(|v| Value::String(v.to_lowercase()))
                .unwrap_or(Value::Null);
            json!({"cell_id": cell(), "action": verb, "state": field("state"),
                   "error": field("error")})
        }
        EventType::CellDrifted | EventType::CellDraining | EventType::CellDrained => {
            json!({"cell_id": cell()})
        }
        EventType::TenantMoved => json!({
            "tenant_id": tenant(),
            "move_id": field("move_id"),
            "env": field("env"),
            "from_cell_id": field("from_cell_id"),
            "to_cell_id": field("to_cell_id"),
            "dedicated": field("dedicated"),
            "rows_copied": field("rows_copied"),
            "bytes_copied": field("bytes_copied"),
            "hold_ms": field("hold_ms"),
        }),
        EventType::TenantMoveRolledBack => json!({
            "tenant_id": tenant(),
            "move_id": field("move_id"),
            "env": field("env"),
            "from_cell_id": field("from_cell_id"),
            "to_cell_id": field("to_cell_id"),
            "error": field("error"),
        }),
        EventType::UsageReported => json!({
            "tenant_id": tenant(),
            "period_start": field("period_start"),
            "period_end": field("period_end"),
            "usage": field("usage"),
        }),
        EventType::WebhookDisabled => json!({
            "webhook_id": id_of("webhook/"),
            "reason": field("reason"),
            "failing_since": field("failing_since"),
        }),
        EventType::ReleaseWaveStarted => json!({
            "release_id": id_of("release/"),
            "wave": field("wave"),
            "cells": field("cells"),
        }),
        EventType::ReleasePaused => {
            let cause = match row.event_type.as_str() {
                "RELEASE_WAVE_AWAITING_APPROVAL" => "approval",
                "RELEASE_GATE_INCONCLUSIVE" => "inconclusive",
                "RELEASE_WAVE_REFUSED" => "budget",
                _ => "cell_failed",
            };
            json!({"release_id": id_of("release/"), "wave": field("wave"), "cause": cause,
                   "cell_id": field("cell_id"), "reason": field("reason")})
        }
        EventType::ReleaseGateFailed => json!({
            "release_id": id_of("release/"),
            "wave": field("wave"),
            "gate": field("gate"),
            "cell_id": field("cell_id"),
            "rollback": field("rollback"),
            "measurements": field("measurements"),
        }),
        EventType::ReleaseHalted => json!({
            "release_id": id_of("release/"),
            "cell_id": field("cell_id"),
            "reason": field("reason"),
        }),
        EventType::ReleaseRolledBack => json!({
            "release_id": id_of("release/"),
            "reverted": field("reverted"),
            "aborted": row.event_type == "RELEASE_ABORTED",
            "reason": field("reason"),
        }),
        EventType::ReleaseSucceeded => json!({
            "release_id": id_of("release/"),
            "app_version": field("app_version"),
        }),
        EventType::WebhookRecovered => json!({
            "webhook_id": id_of("webhook/"),
            "failing_since": field("failing_since"),
            "reenabled": p.get("reenabled").cloned().unwrap_or(Value::Bool(false)),
        }),
    };
    Some(Event {
        specversion: "1.0".into(),
        id: row.event_id.clone(),
        event_type: t.as_str().to_string(),
        source: source.to_string(),
        subject: row.subject.clone(),
        time: row.created_at.clone(),
        datacontenttype: "application/json".into(),
        data: Value::Object(match data {
            Value::Object(m) => m,
            _ => Map::new(),
        }),
        correlationid: row.correlation_id.clone(),
        seq: row.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_type: &str, subject: &str, payload: Value) -> OutboxRow {
        OutboxRow {
            seq: 7,
            event_id: "evt-1".into(),
            event_type: event_type.into(),
            tenant_id: subject.strip_prefix("tenant/").map(str::to_string),
            subject: subject.into(),
            payload,
            correlation_id: Some("corr-1".into()),
            created_at: "2026-12-04T00:00:00.000000Z".into(),
        }
    }

    #[test]
    fn every_public_type_has_an_internal_source() {
        for t in EventType::ALL {
            assert!(!internal_types(&[*t]).is_empty(), "{t} is never published");
        }
        assert_eq!(public_type("ROUTE_CHANGED"), None);
        assert_eq!(public_type("TENANCY_ACTIVATE_REQUESTED"), None);
        assert_eq!(
            public_type("TENANCY_SUSPEND_FAILED"),
            Some(EventType::TenantTransitionFailed)
        );
    }

    #[test]
    fn internal_fields_stay_internal() {
        let e = to_public(
            &row(
                "TENANCY_ACTIVATE_FAILED",
                "tenant/acme",
                json!({"job_id": "job-1", "state": null, "error": "no capacity",
                       "attempts": 3, "released": [], "routes_revision": 12}),
            ),
            "cellplane",
        )
        .unwrap();
        assert_eq!(e.event_type, "dev.cellplane.tenancy.transition_failed.v1");
        assert_eq!(
            e.data,
            json!({"tenant_id": "acme", "action": "activate", "error": "no capacity"})
        );
        assert_eq!((e.seq, e.subject.as_str()), (7, "tenant/acme"));
        let e = to_public(
            &row(
                "CELL_STAMP_FAILED",
                "cell/c1",
                json!({"job_id": "job-2", "state": "failed", "error": "boom", "outputs": {"endpoint": "x"}}),
            ),
            "cellplane",
        )
        .unwrap();
        assert_eq!(
            e.data,
            json!({"cell_id": "c1", "action": "stamp", "state": "failed", "error": "boom"})
        );
        assert!(to_public(&row("ROUTE_CHANGED", "tenant/acme", json!({})), "x").is_none());
    }
}

//! Webhook subscriptions: where published events ([`crate::Event`]) are delivered, signed
//! per Standard Webhooks 1.0 with the subscription's secret.

use crate::Id;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether a subscription's events go out in order per subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookOrdering {
    /// Deliveries may overtake each other (receivers order by `seq`).
    #[default]
    None,
    /// A subject's events are delivered one at a time in `seq` order; a failing one holds
    /// back only that subject's later events.
    PerSubject,
}

impl WebhookOrdering {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOrdering::None => "none",
            WebhookOrdering::PerSubject => "per-subject",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(WebhookOrdering::None),
            "per-subject" => Some(WebhookOrdering::PerSubject),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookState {
    Enabled,
    Disabled,
}

impl WebhookState {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookState::Enabled => "enabled",
            WebhookState::Disabled => "disabled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(WebhookState::Enabled),
            "disabled" => Some(WebhookState::Disabled),
            _ => None,
        }
    }
}

/// `POST /v1/webhooks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// `http` or `https`, no credentials, at most 2048 bytes.
    #[schema(max_length = 2048)]
    pub url: String,
    /// Event types (`dev.cellplane.…`), or `["*"]` for all.
    #[schema(min_items = 1, max_items = 64)]
    pub events: Vec<String>,
    /// Only this tenant's events (a tenant-admin's subscriptions always have its tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<Id>,
    #[serde(default)]
    pub ordering: WebhookOrdering,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 200)]
    pub description: Option<String>,
}

/// `PATCH /v1/webhooks/{webhook_id}`: the fields to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchWebhook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 2048)]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_items = 1, max_items = 64)]
    pub events: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<WebhookOrdering>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 200)]
    pub description: Option<String>,
    /// `disabled` stops deliveries; `enabled` resumes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<WebhookState>,
}

/// A subscription. `secret` is present only in the answers that create it (`POST
/// /v1/webhooks`, `POST …/rotate-secret`): it is stored encrypted and never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Webhook {
    pub webhook_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub tenant_id: Option<String>,
    pub ordering: WebhookOrdering,
    pub state: WebhookState,
    pub description: Option<String>,
    /// `whsec_…` (Standard Webhooks): base64 of the HMAC key after the prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// After a rotation, the previous secret also signs deliveries until this time.
    pub previous_secret_expires_at: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// Since when its deliveries have been failing (absent while they succeed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    /// Why it is disabled: `gone` (the destination answered 410), `failing` (deliveries
    /// failed for `webhooks.disable_after_secs`; it is probed and re-enabled when it answers
    /// again) or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// A 2xx arrived within the timeout.
    Succeeded,
    /// The retry schedule ran out (redeliver or replay to try again).
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "succeeded" => Some(DeliveryState::Succeeded),
            "failed" => Some(DeliveryState::Failed),
            _ => None,
        }
    }
}

/// One attempt of a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WebhookAttempt {
    /// 1 for the first attempt of the delivery, counting across redeliveries.
    pub attempt: i64,
    pub started_at: String,
    /// `delivered` (2xx within the timeout), `failed` (another answer, or no connection),
    /// `timeout`, `throttled` (429, 502, 503, 504) or `gone` (410: the subscription is
    /// disabled).
    pub outcome: String,
    /// The destination's status code, when it answered in time.
    pub status: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
    /// When the next attempt was scheduled (none after a success or the last attempt).
    pub next_attempt_at: Option<String>,
}

/// An event's delivery to one subscription. Every attempt carries the event's id as
/// `webhook-id`, so a receiver dedupes retries, redeliveries and replays.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WebhookDelivery {
    pub delivery_id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: String,
    pub subject: String,
    pub seq: i64,
    pub state: DeliveryState,
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<WebhookAttempt>,
    pub created_at: String,
    pub updated_at: String,
}

/// `POST /v1/webhooks/{webhook_id}/replay`: send again every event of the subscription's
/// types (and tenant) committed in `[since, until)`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayWebhook {
    /// RFC 3339.
    pub since: String,
    /// RFC 3339; default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// What a replay queued.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ReplayQueued {
    /// Deliveries queued (new ones, and ones that start a new schedule).
    pub queued: u64,
    /// The range held more events than one replay takes; replay again from `next_since`.
    pub truncated: bool,
    pub next_since: Option<String>,
}

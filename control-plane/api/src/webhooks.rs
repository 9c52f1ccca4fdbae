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
}

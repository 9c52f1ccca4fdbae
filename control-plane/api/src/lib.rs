//! Wire types, validated identifiers and a thin HTTP client for the cellplane control plane.
//!
//! This crate is what external tools, the CLI and the end-to-end tests share with the server:
//! it must never depend on the server crate, and it holds no business logic beyond the
//! validation of values that travel on the wire.

pub mod client;
pub mod events;
pub mod ids;
pub mod manifests;
pub mod moves;
pub mod releases;
pub mod types;
pub mod usage;
pub mod webhooks;

pub use client::{Client, ClientError};
pub use events::{Event, EventType};
pub use ids::{validate_id, Id, IdError};
pub use manifests::{
    ApplyResult, Condition, Document, Drift, PlanAction, PlannedObject, Refusal, TenantStatus,
};
pub use moves::{Move, MoveRequest, MoveState, MoveWithJob};
pub use types::*;
pub use usage::{UsageBatch, UsagePoint, UsageRecord, UsageReport, METERS};
pub use webhooks::{
    CreateWebhook, DeliveryState, PatchWebhook, ReplayQueued, ReplayWebhook, Webhook,
    WebhookAttempt, WebhookDelivery, WebhookOrdering, WebhookState,
};

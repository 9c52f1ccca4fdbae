//! Tenant moves: `POST /v1/tenants/{id}/move`, `GET /v1/moves[/{move_id}]`.

use crate::types::Job;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/tenants/{id}/move`: move one environment to a named cell, or to a dedicated
/// cell stamped for it (`"target": "dedicated"`). Exactly one of the two.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cell_id: Option<String>,
    /// `dedicated`: stamp a dedicated cell for this tenant environment and move there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    Running,
    Succeeded,
    RolledBack,
    Failed,
}

impl MoveState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "rolled_back" => Self::RolledBack,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
    pub const ALL: [MoveState; 4] = [
        Self::Running,
        Self::Succeeded,
        Self::RolledBack,
        Self::Failed,
    ];
}

/// A move as `GET /v1/moves/{move_id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Move {
    pub move_id: String,
    pub tenant_id: String,
    pub env: String,
    pub source_cell_id: String,
    pub target_cell_id: String,
    /// The target is a dedicated cell stamped by this move.
    pub dedicated: bool,
    pub state: MoveState,
    /// The step running now (or the last one).
    pub step: String,
    pub job_id: String,
    /// Capacity units the environment holds (reserved on the target at the start).
    pub units: i64,
    pub rows_copied: i64,
    pub bytes_copied: i64,
    pub delta_rounds: i64,
    /// Rows in the last delta copied (what is left to catch up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_delta: Option<i64>,
    /// Time the route was held (from the hold's revision to the flip's), once flipped or
    /// rolled back after a hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Checksums, router acks, per-round copy figures, timings.
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// `POST /v1/tenants/{id}/move` → 202.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MoveWithJob {
    #[serde(rename = "move")]
    pub move_: Move,
    pub job: Job,
}

//! Releases: an app version plus template variables rolled out to cells wave by wave,
//! gated by what the cells' traffic shows (`POST /v1/releases`, `GET /v1/releases[/{id}]`,
//! `POST /v1/releases/{id}/pause|resume|approve|abort|retry|skip`).

use crate::ids::Id;
use crate::types::{Job, Tier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Which cells a wave takes: every condition given must hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cells: Option<Vec<Id>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    #[default]
    Auto,
    /// The wave starts only after `POST /v1/releases/{id}/approve`.
    Manual,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WaveSpec {
    pub name: Id,
    #[serde(default)]
    pub selector: Selector,
    /// Cells of the wave applied at once (default 1).
    #[serde(default = "one")]
    pub max_parallel: u32,
    /// How long the wave's cells are watched after they are applied (default 300).
    #[serde(default = "default_bake")]
    #[schema(minimum = 0)]
    pub bake_seconds: i64,
    #[serde(default)]
    pub approval: Approval,
}

fn one() -> u32 {
    1
}
fn default_bake() -> i64 {
    300
}

/// A latency gate: the `percentile` (0..1) of the wave's cells' latency must stay at or
/// under `max_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencyGate {
    #[serde(default = "p99")]
    pub percentile: f64,
    pub max_ms: f64,
}

fn p99() -> f64 {
    0.99
}

/// Where gates read the cells' traffic.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricsSource {
    /// What routers report with their heartbeats (per cell, by status class, and the
    /// latency histogram).
    #[default]
    Builtin,
    /// PromQL against the Prometheus configured as `metrics.prometheus_url`, which scrapes
    /// the routers' `/__router/metrics`.
    Prometheus,
}

/// One multi-window burn-rate rule: fails when both windows burn the error budget faster
/// than `factor`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BurnRuleSpec {
    pub long_secs: u64,
    pub short_secs: u64,
    pub factor: f64,
}

/// The cells' SLO burn rate: a request is bad when it fails (5xx) or, with
/// `latency_threshold_ms`, when it is slower. Default rules: 14.4× over 1 h with 5 min,
/// 6× over 6 h with 30 min (windows may be seconds).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BurnRateGate {
    pub slo_target: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_threshold_ms: Option<f64>,
    #[serde(default = "default_rules")]
    pub rules: Vec<BurnRuleSpec>,
}

fn default_rules() -> Vec<BurnRuleSpec> {
    vec![
        BurnRuleSpec {
            long_secs: 3600,
            short_secs: 300,
            factor: 14.4,
        },
        BurnRuleSpec {
            long_secs: 6 * 3600,
            short_secs: 1800,
            factor: 6.0,
        },
    ]
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BaselineMetric {
    #[default]
    ErrorRatio,
    Latency,
}

/// Canary against baseline: every `step_secs` of the window is one sample per cell (its
/// error ratio, or its latency `percentile`); the wave's cells (new version) are compared
/// with the cells still on the old version by a one-sided Mann-Whitney U test. The gate
/// fails when the new version is worse with `confidence` (p < 1 − confidence); fewer than
/// `min_samples` on either side is inconclusive; a wave with no cell left on the old
/// version records `not_applicable`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BaselineGate {
    #[serde(default)]
    pub metric: BaselineMetric,
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    #[serde(default = "default_min_samples")]
    pub min_samples: u32,
    #[serde(default = "default_step")]
    pub step_secs: u64,
    #[serde(default = "p99")]
    pub percentile: f64,
}

fn default_confidence() -> f64 {
    0.98
}
fn default_min_samples() -> u32 {
    5
}
fn default_step() -> u64 {
    5
}

/// A time no new wave starts in (RFC 3339).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FreezeWindow {
    pub start: String,
    pub end: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The gates evaluated every `interval_secs` during a wave's bake, per cell. A measurement
/// with fewer than `min_requests` requests is inconclusive (never a success).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    #[serde(default)]
    pub provider: MetricsSource,
    #[serde(default = "default_interval")]
    pub interval_secs: i64,
    /// After a wave's cells were applied, how long nothing is measured (processes
    /// replaced, routers' health checks passing again; default 3). The first evaluation
    /// comes one interval after that.
    #[serde(default = "default_settle")]
    pub settle_secs: i64,
    /// The traffic each evaluation looks at: the last `window_secs` (default 60), never
    /// from before the wave's cells settled (`settle_secs` after they were applied). Keep
    /// it at two router heartbeats or more.
    #[serde(default = "default_window")]
    pub window_secs: i64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Most 5xx responses over all responses (default 0.05); `null` turns the gate off.
    #[serde(default = "default_error_ratio")]
    pub max_error_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyGate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burn_rate: Option<BurnRateGate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineGate>,
    /// Failures allowed before the gate fails the wave (default 0).
    #[serde(default)]
    pub failure_limit: u32,
    /// Provider errors in a row that halt the release (default 4).
    #[serde(default = "default_consecutive_errors")]
    pub consecutive_error_limit: u32,
    /// Inconclusive measurements allowed before the release pauses for a human (default 0).
    #[serde(default)]
    pub inconclusive_limit: u32,
    /// Record measurements without deciding anything.
    #[serde(default)]
    pub dry_run: bool,
    /// The cells' availability SLO (e.g. 0.999): with `min_budget`, the budget gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_target: Option<f64>,
    /// Before a wave starts, every cell of it must have at least this fraction of its error
    /// budget left over the last `budget_window_secs` (0..1), or the wave does not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_budget: Option<f64>,
    #[serde(default = "default_budget_window")]
    pub budget_window_secs: u64,
}

fn default_budget_window() -> u64 {
    3600
}

fn default_interval() -> i64 {
    30
}
fn default_settle() -> i64 {
    3
}
fn default_window() -> i64 {
    60
}
fn default_min_requests() -> u64 {
    20
}
fn default_error_ratio() -> Option<f64> {
    Some(0.05)
}
fn default_consecutive_errors() -> u32 {
    4
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            provider: MetricsSource::Builtin,
            interval_secs: default_interval(),
            settle_secs: default_settle(),
            window_secs: default_window(),
            min_requests: default_min_requests(),
            max_error_ratio: default_error_ratio(),
            latency: None,
            burn_rate: None,
            baseline: None,
            failure_limit: 0,
            consecutive_error_limit: default_consecutive_errors(),
            inconclusive_limit: 0,
            dry_run: false,
            slo_target: None,
            min_budget: None,
            budget_window_secs: default_budget_window(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RollbackPolicy {
    /// A failed gate puts the wave's cells back, then every earlier wave's, in reverse.
    #[default]
    Auto,
    /// A failed gate pauses the release; `abort` rolls back.
    Manual,
    /// A failed gate halts the release and changes nothing (non-backward-compatible
    /// releases): a human takes over.
    Never,
}

/// `POST /v1/releases`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRelease {
    pub release_id: Id,
    pub app_version: String,
    /// Template variables set on every cell of the release (merged over each cell's own).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Default: `canary` (cells labelled `canary=true`), `pooled`, `dedicated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<WaveSpec>>,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub rollback: RollbackPolicy,
    /// No new wave starts inside one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze_windows: Vec<FreezeWindow>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    Running,
    Paused,
    /// Putting back what it changed (a failed gate, or an abort).
    RollingBack,
    Succeeded,
    /// Halted (provider errors, a failed gate with `rollback: never`, a cell that cannot
    /// be applied): a human takes over.
    Failed,
    RolledBack,
    Aborted,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::RollingBack => "rolling_back",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Aborted => "aborted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Paused,
            Self::RollingBack,
            Self::Succeeded,
            Self::Failed,
            Self::RolledBack,
            Self::Aborted,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
    /// Still holds its cells (another release may not take them).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::RollingBack)
    }
}

/// One cell of a wave: what it ran before the release and where it is now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ReleaseCell {
    pub cell_id: String,
    /// `pending`, `waiting` (for its tenant's change window), `applying`, `applied`,
    /// `failed`, `skipped`, `reverting`, `reverted`.
    pub state: String,
    pub from_version: Option<String>,
    pub to_version: String,
    /// The cell's own variables before the release (put back on rollback).
    #[schema(value_type = Object)]
    pub from_vars: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ReleaseWave {
    pub name: String,
    /// `pending`, `awaiting_approval`, `applying`, `baking`, `passed`, `failed`,
    /// `rolled_back`.
    pub state: String,
    pub approval: Approval,
    pub max_parallel: u32,
    pub bake_seconds: i64,
    pub cells: Vec<ReleaseCell>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_started_at: Option<String>,
}

/// One gate decision with the numbers that drove it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct GateDecision {
    pub at: String,
    pub wave: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_id: Option<String>,
    /// `error_ratio`, `latency`, `bake` (the wave's verdict).
    pub gate: String,
    /// `success`, `failure`, `inconclusive`, `error` (or `passed` for a bake).
    pub result: String,
    #[schema(value_type = Object)]
    pub measurements: serde_json::Value,
    /// Recorded by a `dry_run` gate: decided nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Release {
    pub release_id: String,
    pub app_version: String,
    #[schema(value_type = Object)]
    pub vars: BTreeMap<String, serde_json::Value>,
    pub state: ReleaseState,
    pub gates: Gates,
    pub rollback: RollbackPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze_windows: Vec<FreezeWindow>,
    pub waves: Vec<ReleaseWave>,
    pub decisions: Vec<GateDecision>,
    /// Why the release is paused, failed or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub job_id: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReleaseWithJob {
    pub release: Release,
    pub job: Job,
}

/// `POST /v1/releases/{id}/retry|skip`: the cell to retry or skip.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseCellAction {
    pub cell_id: Id,
}

//! Request and response bodies of the v1 HTTP contract (`shared/docs/contract.md`).
//!
//! Requests deny unknown fields so a typo is a 400, not a silently ignored setting.
//! Responses are plain data; the server decides what they contain.

use crate::ids::Id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// One page of a list: `next_cursor` is null on the last page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// RFC 7807 problem document returned for every error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// A validation failure of one field of the request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

// ---------------------------------------------------------------- organizations

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    pub organization_id: Id,
    /// Display name: not blank, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Organization {
    pub organization_id: String,
    pub name: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

// ---------------------------------------------------------------- tenants

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
pub enum Profile {
    #[serde(rename = "mt-standard")]
    MtStandard,
    #[serde(rename = "st-dedicated")]
    StDedicated,
    #[serde(rename = "st-byoc")]
    StByoc,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::MtStandard => "mt-standard",
            Profile::StDedicated => "st-dedicated",
            Profile::StByoc => "st-byoc",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mt-standard" => Some(Self::MtStandard),
            "st-dedicated" => Some(Self::StDedicated),
            "st-byoc" => Some(Self::StByoc),
            _ => None,
        }
    }
    /// Pooled tenants share a cell; the others get a dedicated cell of their own.
    pub fn is_pooled(self) -> bool {
        matches!(self, Profile::MtStandard)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TenantState {
    Draft,
    Active,
    Suspended,
    Archived,
    Deleted,
}

impl TenantState {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantState::Draft => "draft",
            TenantState::Active => "active",
            TenantState::Suspended => "suspended",
            TenantState::Archived => "archived",
            TenantState::Deleted => "deleted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "draft" => Some(Self::Draft),
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "archived" => Some(Self::Archived),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// Lifecycle actions on a tenant; each is a state transition run as a job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleAction {
    Activate,
    Suspend,
    Resume,
    Archive,
    Delete,
}

impl LifecycleAction {
    pub const ALL: [LifecycleAction; 5] = [
        Self::Activate,
        Self::Suspend,
        Self::Resume,
        Self::Archive,
        Self::Delete,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Archive => "archive",
            Self::Delete => "delete",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
    /// States the action may start from, and the state it ends in.
    pub fn transition(self) -> (&'static [TenantState], TenantState) {
        use TenantState::*;
        match self {
            Self::Activate => (&[Draft], Active),
            Self::Suspend => (&[Active], Suspended),
            Self::Resume => (&[Suspended], Active),
            Self::Archive => (&[Active, Suspended], Archived),
            Self::Delete => (&[Archived], Deleted),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(
        rename = "storageGiB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub storage_gib: Option<u64>,
    #[serde(
        rename = "concurrentJobs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub concurrent_jobs: Option<u64>,
    #[serde(
        rename = "apiRateLimit",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub api_rate_limit: Option<u64>,
    /// Capacity units the tenant takes in a pooled cell (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DataResidency {
    InRegionOnly,
    AllowedRegions,
    Any,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    KmsPerTenant,
    KmsShared,
    Provider,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    #[serde(
        rename = "dataResidency",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub data_residency: Option<DataResidency>,
    #[serde(
        rename = "allowedRegions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allowed_regions: Option<Vec<Id>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    #[serde(
        rename = "retentionDays",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub retention_days: Option<u32>,
    /// When a release may apply the tenant's dedicated cell (UTC); none: any time.
    #[serde(
        rename = "changeWindows",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub change_windows: Option<Vec<ChangeWindow>>,
}

/// A recurring window, in UTC, in which a release may change a tenant's dedicated cell:
/// `start` to `end` (`HH:MM`; an `end` before `start` runs past midnight) on `days`
/// (`mon` … `sun`; every day when left out).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChangeWindow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<String>>,
    pub start: String,
    pub end: String,
}

impl ChangeWindow {
    /// `HH:MM` as minutes after midnight.
    pub fn minutes(s: &str) -> Option<u32> {
        let (h, m) = s.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    }

    pub const DAYS: [&'static str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

    /// Whether `weekday` (0 = Monday) at `minute` after midnight falls inside the window.
    /// A window past midnight belongs to the day it starts on.
    pub fn contains(&self, weekday: u32, minute: u32) -> bool {
        let (Some(start), Some(end)) = (Self::minutes(&self.start), Self::minutes(&self.end))
        else {
            return false;
        };
        let on = |d: u32| {
            self.days.as_ref().is_none_or(|days| {
                days.iter()
                    .any(|x| Self::DAYS.get(d as usize) == Some(&x.as_str()))
            })
        };
        if start <= end {
            on(weekday) && minute >= start && minute < end
        } else {
            (on(weekday) && minute >= start) || (on((weekday + 6) % 7) && minute < end)
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Billing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(
        rename = "costCenter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cost_center: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub tenant_id: Id,
    pub organization_id: Id,
    pub profile: Profile,
    pub region: Id,
    #[serde(default)]
    pub quotas: Quotas,
    #[serde(default)]
    pub policies: Policies,
    #[serde(default)]
    pub billing: Billing,
}

/// `PATCH /v1/tenants/{id}`: each present section replaces the stored one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchTenant {
    /// A new profile, alone in its request. `mt-standard` → `st-dedicated` on an active
    /// tenant moves its placed environment to a dedicated cell stamped for it (answered
    /// 202 with the move; the profile changes at the move's flip); on a tenant with
    /// nothing placed it just changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Policies>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<Billing>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Environment {
    pub name: String,
    pub region: String,
    pub isolation_level: String,
    pub cell_id: Option<String>,
    pub endpoint: Option<String>,
    /// Where this environment's data lives under its isolation strategy.
    #[schema(value_type = Object)]
    pub resource_mapping: BTreeMap<String, String>,
    pub created_at: String,
    /// On `POST …/environments` for an active tenant (or one with a lifecycle job in
    /// progress): the `tenant.place` job that places the new environment and publishes its
    /// route. Absent otherwise: a draft or suspended tenant's environments are placed on
    /// activate or resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_job_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    pub tenant_id: String,
    pub organization_id: String,
    pub profile: Profile,
    pub state: TenantState,
    pub region: String,
    pub quotas: Quotas,
    pub policies: Policies,
    pub billing: Billing,
    pub environments: Vec<Environment>,
    /// The lifecycle job currently queued or running for this tenant, if any.
    pub pending_job_id: Option<String>,
    /// The last placement decision and its reason (filled by the placement pipeline).
    #[schema(value_type = Option<Object>)]
    pub placement: Option<serde_json::Value>,
    pub version: i64,
    /// The lifecycle state asked for (by a manifest or the last lifecycle action); the
    /// tenant controller converges `state` to it.
    pub desired_state: TenantState,
    /// Moves with every change of the desired spec (quotas, policies, billing, profile,
    /// environments, desired state), through `POST /v1/apply` or an imperative call.
    pub generation: i64,
    /// What the tenant controller last found (absent until its first pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::manifests::TenantStatus>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum EnvName {
    Prod,
    Stage,
    Dev,
}

impl EnvName {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvName::Prod => "prod",
            EnvName::Stage => "stage",
            EnvName::Dev => "dev",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IsolationLevel {
    #[default]
    Shared,
    Strict,
}

impl IsolationLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationLevel::Shared => "shared",
            IsolationLevel::Strict => "strict",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    pub name: EnvName,
    #[serde(default)]
    pub region: Option<Id>,
    #[serde(default)]
    pub isolation_level: IsolationLevel,
}

// ---------------------------------------------------------------- cells

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Pooled,
    Dedicated,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Pooled => "pooled",
            Tier::Dedicated => "dedicated",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pooled" => Some(Self::Pooled),
            "dedicated" => Some(Self::Dedicated),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CellState {
    Pending,
    Provisioning,
    Active,
    Draining,
    /// Drained by `cell.drain`: no tenant environment is left on it.
    Drained,
    Destroying,
    Destroyed,
    Failed,
}

impl CellState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Provisioning,
            Self::Active,
            Self::Draining,
            Self::Drained,
            Self::Destroying,
            Self::Destroyed,
            Self::Failed,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// At least one: a cell that can hold no tenant is refused.
    #[schema(minimum = 1, maximum = 9007199254740991_u64)]
    pub tenants: u64,
    #[schema(maximum = 9007199254740991_u64)]
    pub units: u64,
}

/// What a cell holds now: the shape of `Capacity`, where zero tenants is normal.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Usage {
    pub tenants: u64,
    pub units: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCell {
    pub cell_id: Id,
    pub region: Id,
    pub tier: Tier,
    pub template: Id,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub vars: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub app_version: Option<String>,
}

/// `PATCH /v1/cells/{id}`: registry fields an operator may change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchCell {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub vars: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cell {
    pub cell_id: String,
    pub region: String,
    pub tier: Tier,
    pub template: String,
    pub capacity: Capacity,
    #[schema(value_type = Usage)]
    pub used: Capacity,
    pub labels: BTreeMap<String, String>,
    #[schema(value_type = Object)]
    pub vars: BTreeMap<String, serde_json::Value>,
    pub state: CellState,
    #[schema(value_type = Object)]
    pub outputs: BTreeMap<String, serde_json::Value>,
    pub app_version: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub drift: Option<serde_json::Value>,
    pub pending_job_id: Option<String>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CellWithJob {
    pub cell: Cell,
    pub job: Option<Job>,
}

/// What the last drift check of a cell found (`Cell::drift`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DriftStatus {
    /// Whether real infrastructure differs from the recorded state.
    pub detected: bool,
    /// Addresses of the resources that changed outside terraform.
    pub resources: Vec<String>,
    pub checked_at: String,
    /// The drift-check job that produced this result.
    pub job_id: String,
}

// ---------------------------------------------------------------- templates

/// A cell template found in the template directory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateInfo {
    pub name: String,
    pub description: String,
    pub tiers: Vec<Tier>,
    pub default_app_version: Option<String>,
    /// Outputs every stack of this template must produce (at least `endpoint`).
    pub required_outputs: Vec<String>,
    pub variables: Vec<TemplateVariable>,
}

/// A variable a template declares.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateVariable {
    pub name: String,
    /// `string`, `number`, `bool`, `list` or `map`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Any JSON value: a string, number, bool, list or map, as the variable's type says.
    #[schema(value_type = Option<serde_json::Value>)]
    pub default: Option<serde_json::Value>,
    pub description: String,
    /// No default and not managed: a cell must set it.
    pub required: bool,
    pub sensitive: bool,
    /// Set when cellplane supplies the value (`port`, `secret`, `cell_dir`, …); such a
    /// variable cannot be set by users.
    pub managed_by: Option<String>,
    /// Rules the value must pass: `pattern`, `allowed`, `min`, `max`, `max_length`.
    #[schema(value_type = Option<Object>)]
    pub validation: Option<serde_json::Value>,
}

// ---------------------------------------------------------------- jobs

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub job_id: String,
    pub kind: String,
    pub target: String,
    pub state: JobState,
    pub progress: f64,
    pub attempts: i64,
    pub max_attempts: i64,
    pub step: Option<String>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub correlation_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

// ---------------------------------------------------------------- audit

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditRecord {
    pub seq: i64,
    pub audit_id: String,
    pub tenant_id: Option<String>,
    pub event_type: String,
    pub actor: String,
    pub target: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub correlation_id: Option<String>,
    pub occurred_at: String,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditVerify {
    pub ok: bool,
    pub records: i64,
    /// The first record whose hash, link or sequence does not hold.
    pub broken_seq: Option<i64>,
    pub reason: Option<String>,
}

// ---------------------------------------------------------------- tokens

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    Operator,
    Viewer,
    Router,
    TenantAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Router => "router",
            Role::TenantAdmin => "tenant-admin",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Admin,
            Self::Operator,
            Self::Viewer,
            Self::Router,
            Self::TenantAdmin,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub role: Role,
    #[serde(default)]
    pub tenant_id: Option<Id>,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub token_id: String,
    pub role: Role,
    pub tenant_id: Option<String>,
    pub description: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// Returned once by `POST /v1/tokens`: the secret is never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The secret. Absent on an idempotent replay (`Idempotent-Replay-Withheld: token`),
    /// which then reads as empty: it is never stored, so it cannot be sent twice.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

// ---------------------------------------------------------------- routing

/// What the router does with a tenant environment's requests.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    /// Forward to the route's cell.
    Serve,
    /// Park requests (bounded in time and count) until the route changes.
    Hold,
    /// Refuse with 403.
    Suspended,
}

impl RouteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteMode::Serve => "serve",
            RouteMode::Hold => "hold",
            RouteMode::Suspended => "suspended",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "serve" => Some(Self::Serve),
            "hold" => Some(Self::Hold),
            "suspended" => Some(Self::Suspended),
            _ => None,
        }
    }
}

/// One entry of the routing table: `(tenant_id, env) → cell`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Route {
    pub tenant_id: String,
    pub env: String,
    pub cell_id: String,
    /// Base URL of the cell, e.g. `http://127.0.0.1:8081`.
    pub endpoint: String,
    pub mode: RouteMode,
    /// Sustained requests per second the router admits for this tenant (burst = rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub tenant_id: String,
    pub env: String,
}

/// `GET /v1/routes?since=`: the changes after `since`, or the whole table when `full`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteChanges {
    pub revision: i64,
    pub full: bool,
    pub upserts: Vec<Route>,
    pub removals: Vec<RouteKey>,
}

/// `PATCH /v1/routes/{tenant_id}/{env}`: operators hold and release a route.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchRoute {
    /// `hold` or `serve`; `suspended` belongs to the tenant lifecycle.
    pub mode: RouteMode,
}

/// One retained change of the routing table.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteHistoryEntry {
    pub revision: i64,
    pub tenant_id: String,
    pub env: String,
    /// `upsert` or `remove`.
    pub op: String,
    pub cell_id: Option<String>,
    pub mode: Option<RouteMode>,
    pub changed_at: String,
}

/// `POST /v1/routers/{router_id}/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterHeartbeat {
    pub applied_revision: i64,
    /// The newest revision at which every route this router holds had no request still
    /// in flight to the cell it pointed at before (the router *drained* its held routes).
    /// Absent from routers that do not track it: such a router is never assumed drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub stats: Option<serde_json::Value>,
    /// Usage batches not yet acknowledged (applied once each, by `batch_id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<crate::UsageBatch>,
    /// Per-cell counters since the router started (release gates' built-in metrics).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<CellCounters>,
}

/// What a router has forwarded to one cell since it started: responses by status class
/// (`codes[0]` 1xx … `codes[4]` 5xx) and the latency histogram, `buckets[i]` the requests
/// answered within `le[i]` seconds, cumulative, with one more entry last: all requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellCounters {
    pub cell_id: String,
    pub codes: Vec<u64>,
    pub le: Vec<f64>,
    pub buckets: Vec<u64>,
}

/// `GET /v1/cells/{id}/metrics`: the cell's traffic over a window, from what routers
/// reported in their heartbeats.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CellMetrics {
    pub cell_id: String,
    pub window_secs: u64,
    /// Routers that reported the cell in the window.
    pub routers: u64,
    pub requests: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    pub error_ratio: Option<f64>,
    /// Latency percentiles from the histogram (interpolated inside a bucket).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A controller's lease: which replica runs it now and at which term.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ControllerInfo {
    pub name: String,
    /// The replica holding (or last holding) the lease.
    pub holder: String,
    /// Grows each time another replica takes the lease; writes carry it.
    pub term: i64,
    pub expires_at: String,
    pub acquired_at: String,
    pub renewed_at: String,
    /// The lease had not expired when read (database clock).
    pub live: bool,
    /// The replica that answered holds it.
    pub this_replica: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouterInfo {
    pub router_id: String,
    pub applied_revision: i64,
    /// See [`RouterHeartbeat::drained_revision`]; 0 when the router never reported one.
    #[serde(default)]
    pub drained_revision: i64,
    /// Revisions the router is behind the table (0 when current).
    pub lag: i64,
    #[schema(value_type = Option<Object>)]
    pub stats: Option<serde_json::Value>,
    pub first_seen: String,
    pub last_seen: String,
    /// Seen within the liveness window (three heartbeat intervals).
    pub live: bool,
}

// ---------------------------------------------------------------- regions

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlacementStrategy {
    /// Least utilized cell first.
    #[default]
    Spread,
    /// Most utilized cell that still fits first.
    Binpack,
}

impl PlacementStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementStrategy::Spread => "spread",
            PlacementStrategy::Binpack => "binpack",
        }
    }
}

/// Placement policy of a region: `PUT /v1/regions/{region}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionPolicy {
    /// Stamp a new pooled cell when no pooled cell has room.
    #[serde(default)]
    pub auto_stamp: bool,
    /// Template of auto-stamped and dedicated cells.
    #[serde(default = "default_template")]
    pub default_template: Id,
    /// Capacity of auto-stamped pooled cells.
    #[serde(default = "default_pooled_capacity")]
    pub pooled_capacity: Capacity,
    /// Pre-stamp a pooled cell when the region's pooled utilization passes this (0..1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prestamp_threshold: Option<f64>,
    #[serde(default)]
    pub strategy: PlacementStrategy,
    /// Variables given to cells stamped by placement.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub vars: BTreeMap<String, serde_json::Value>,
}

fn default_template() -> Id {
    Id::parse("local").expect("a valid identifier")
}

fn default_pooled_capacity() -> Capacity {
    Capacity {
        tenants: 50,
        units: 100,
    }
}

impl Default for RegionPolicy {
    fn default() -> Self {
        Self {
            auto_stamp: false,
            default_template: default_template(),
            pooled_capacity: default_pooled_capacity(),
            prestamp_threshold: None,
            strategy: PlacementStrategy::Spread,
            vars: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Region {
    pub region: String,
    pub policy: RegionPolicy,
    pub version: i64,
    pub updated_at: String,
}

/// Why a tenant environment went where it did; stored on the tenant (`placement`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PlacementDecision {
    pub env: String,
    pub cell_id: String,
    pub region: String,
    pub tier: Tier,
    /// `spread`, `binpack` or `dedicated`.
    pub strategy: String,
    /// Human-readable reason, e.g. "least utilized active pooled cell in eu-west-1 (…)".
    pub reason: String,
    /// Utilization of the chosen cell after placement (0..1).
    pub utilization_after: f64,
    /// Cells that were considered, best first.
    pub candidates: Vec<String>,
    /// Whether a cell was stamped for this placement.
    pub stamped: bool,
    pub units: u64,
    pub decided_at: String,
}

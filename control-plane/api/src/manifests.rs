//! Manifests: the declarative form of organizations, tenants, cells and region policies
//! (`POST /v1/apply`, `GET /v1/manifests/{kind}/{name}`), the plan an apply answers with, and
//! the status the tenant controller writes.

use crate::ids::Id;
use crate::types::{
    Billing, Capacity, EnvName, IsolationLevel, Policies, Profile, Quotas, RegionPolicy,
    TenantState, Tier,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The only `apiVersion` this server reads and writes.
pub const API_VERSION: &str = "cellplane.dev/v1";

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub enum Kind {
    Organization,
    RegionPolicy,
    Cell,
    Tenant,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Organization => "Organization",
            Kind::RegionPolicy => "RegionPolicy",
            Kind::Cell => "Cell",
            Kind::Tenant => "Tenant",
        }
    }
    /// The lowercase name used in paths (`/v1/manifests/tenant/acme`) and by the CLI.
    pub fn parse_lower(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "organization" | "organizations" | "org" | "orgs" => Some(Kind::Organization),
            "regionpolicy" | "regionpolicies" | "region" | "regions" => Some(Kind::RegionPolicy),
            "cell" | "cells" => Some(Kind::Cell),
            "tenant" | "tenants" => Some(Kind::Tenant),
            _ => None,
        }
    }
}

/// `metadata` of a document. `version` is the optimistic-concurrency guard (a stale one is
/// 409); `generation` is written by the server and ignored on apply.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: Id,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// One document: `{apiVersion, kind, metadata, spec}`; `status` is written by the server
/// and ignored on apply (so `get -o yaml | apply` works).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: Kind,
    pub metadata: ObjectMeta,
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrganizationSpec {
    pub name: String,
}

/// The lifecycle state a manifest asks for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Registered, not placed (only for a tenant that is a draft now).
    Draft,
    #[default]
    Active,
    Suspended,
    Archived,
}

impl DesiredState {
    pub fn as_tenant_state(self) -> TenantState {
        match self {
            DesiredState::Draft => TenantState::Draft,
            DesiredState::Active => TenantState::Active,
            DesiredState::Suspended => TenantState::Suspended,
            DesiredState::Archived => TenantState::Archived,
        }
    }
    pub fn from_tenant_state(s: TenantState) -> Option<Self> {
        match s {
            TenantState::Draft => Some(DesiredState::Draft),
            TenantState::Active => Some(DesiredState::Active),
            TenantState::Suspended => Some(DesiredState::Suspended),
            TenantState::Archived => Some(DesiredState::Archived),
            TenantState::Deleted => None,
        }
    }
}

/// An environment of a tenant manifest. `region` defaults to the tenant's (or, for an
/// environment that exists, to its own); `isolation_level` to what an existing environment
/// has, else `shared`, except a new tenant's `prod`: `shared` for pooled profiles, `strict`
/// otherwise.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSpec {
    pub name: EnvName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation_level: Option<IsolationLevel>,
}

/// What `POST /v1/tenants` carries, plus the environments and the desired lifecycle state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub organization_id: Id,
    pub profile: Profile,
    pub region: Id,
    #[serde(default)]
    pub quotas: Quotas,
    #[serde(default)]
    pub policies: Policies,
    #[serde(default)]
    pub billing: Billing,
    /// Defaults to `[{name: prod}]`. Environments are added, never removed, by an apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<EnvironmentSpec>>,
    /// Defaults to `active`.
    #[serde(default)]
    pub state: DesiredState,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellSpec {
    pub region: Id,
    pub tier: Tier,
    pub template: Id,
    pub capacity: Capacity,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub vars: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
}

/// A region's placement policy as a manifest spec (`metadata.name` is the region).
pub type RegionPolicySpec = RegionPolicy;

// ---------------------------------------------------------------- plans

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PlanAction {
    Create,
    Update,
    Unchanged,
}

/// One changed field: `path` is dotted from the document root (`spec.quotas.apiRateLimit`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct FieldChange {
    pub path: String,
    #[schema(value_type = Option<Object>)]
    pub from: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub to: Option<serde_json::Value>,
}

/// Why an object cannot be applied as written. `blocking` refusals (an illegal transition, a
/// residency violation, an immutable field, a stale version) keep the object out of the
/// apply; a non-blocking one (`NoCapacity`) is stored and reported in the tenant's status
/// until it converges.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Refusal {
    /// `IllegalTransition`, `ResidencyViolation`, `Immutable`, `NeedsMove`, `StaleVersion`,
    /// `Conflict` (blocking), `NoCapacity` (not blocking).
    pub reason: String,
    pub message: String,
    pub blocking: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlannedObject {
    /// The document's position in the request (0-based).
    pub index: usize,
    pub kind: Kind,
    pub name: String,
    pub action: PlanAction,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<FieldChange>,
    /// The jobs this change will run, in words ("stamp cell euw1-pool-3", "activate acme:
    /// place prod in eu-west-1 (today: euw1-pool-2, utilization after 0.31)").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// Whether this object's change was stored (false in a dry run, for refused objects
    /// and for every object of a refused all-or-nothing apply).
    pub applied: bool,
    /// The object's generation after the apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// The answer of `POST /v1/apply`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApplyResult {
    pub dry_run: bool,
    pub partial: bool,
    pub objects: Vec<PlannedObject>,
    /// Documents that could not be read (`--partial` only: otherwise they are a 400).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<crate::types::FieldError>,
}

// ---------------------------------------------------------------- status

/// `True`, `False` or `Unknown`, as in Kubernetes conditions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(rename = "lastTransitionTime")]
    pub last_transition_time: String,
}

/// A difference between what is desired and what is, that the controller found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Drift {
    /// What differs, e.g. `environments.prod.cell`.
    pub field: String,
    pub desired: String,
    pub actual: String,
}

/// Written by the tenant controller. `phase`: `Ready`, `Progressing` (a job or move runs,
/// or one is about to start), `Blocked` (waiting for something outside the spec, e.g.
/// capacity), `Failed` (a convergence failed and is retried with backoff, or the desired
/// state is out of reach) or `Degraded` (converged but drifted).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TenantStatus {
    #[serde(rename = "observedGeneration")]
    pub observed_generation: i64,
    pub phase: String,
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<Drift>,
    /// Consecutive failed convergences and when the next try is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    #[serde(
        rename = "nextRetryTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub next_retry_time: Option<String>,
    /// The last failed job of the tenant the controller has counted.
    #[serde(
        rename = "lastFailedJob",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub last_failed_job: Option<String>,
}

impl TenantStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

//! `/v1/audit`: the hash-chained audit trail and its verification.

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiQuery};
use super::AppState;
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::{Extension, Json};
use cellplane_api::{AuditRecord, AuditVerify, Page, Problem};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[param(pattern = "^[a-z][a-z0-9-]{1,62}$")]
    pub tenant_id: Option<String>,
    /// e.g. `tenant/acme`, `cell/euw1-pool-1`.
    pub target: Option<String>,
    /// RFC 3339 timestamp: records at or after it.
    pub since: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(ListParams),
    responses((status = 200, body = Page<AuditRecord>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<AuditRecord>>> {
    let mut tenant_id = q.tenant_id;
    if let Some(t) = &tenant_id {
        cellplane_api::validate_id(t).map_err(|e| ApiError::field("tenant_id", e.to_string()))?;
    }
    match p.tenant_scope() {
        Some(own) => {
            if tenant_id.as_deref().is_some_and(|t| t != own) {
                return Err(ApiError::not_found("no such resource"));
            }
            tenant_id = Some(own.to_string());
        }
        None => p.allow(Access::Read)?,
    }
    if let Some(t) = &q.target {
        if t.len() > 200 || t.chars().any(|c| c.is_control()) {
            return Err(ApiError::field("target", "is not a valid target"));
        }
    }
    let since = match &q.since {
        Some(s) => Some(
            crate::persistence::parse_time(s)
                .map(crate::persistence::fmt_time)
                .ok_or_else(|| ApiError::field("since", "must be an RFC 3339 timestamp"))?,
        ),
        None => None,
    };
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let after_seq: i64 = if after.is_empty() {
        0
    } else {
        after
            .parse()
            .map_err(|_| ApiError::field("cursor", "is not a cursor returned by this API"))?
    };
    let items = s
        .service
        .list_audit(
            tenant_id.as_deref(),
            q.target.as_deref(),
            since.as_deref(),
            after_seq,
            limit + 1,
        )
        .await?;
    Ok(Json(page(items, limit, |r| r.seq.to_string())))
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    responses((status = 200, body = AuditVerify)))]
pub async fn verify(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<AuditVerify>> {
    p.allow(Access::Read)?;
    Ok(Json(s.service.verify_audit().await?))
}

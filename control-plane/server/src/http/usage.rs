//! `GET /v1/usage`: metered usage per tenant environment, meter and period.

use super::error::{ApiError, ApiResult};
use super::extract::ApiQuery;
use super::AppState;
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::{Extension, Json};
use cellplane_api::{Problem, UsageReport};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Only this tenant (a tenant-admin always gets its own).
    pub tenant_id: Option<String>,
    /// Only this environment.
    pub env: Option<String>,
    /// `requests`, `request_bytes`, `response_bytes` or `units` (default: all).
    pub meter: Option<String>,
    /// RFC 3339; default: a day before `to`. Rounded down to a period boundary.
    pub from: Option<String>,
    /// RFC 3339, exclusive; default: now.
    pub to: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    pub granularity: Option<String>,
}

#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageParams),
    responses((status = 200, body = UsageReport), (status = 400, body = Problem)))]
pub async fn report(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<UsageParams>,
) -> ApiResult<Json<UsageReport>> {
    let tenant_id = match p.tenant_scope() {
        Some(own) => {
            if q.tenant_id.as_deref().is_some_and(|t| t != own) {
                return Err(ApiError::field(
                    "tenant_id",
                    "a tenant-admin reads its own tenant's usage only",
                ));
            }
            Some(own.to_string())
        }
        None => {
            p.allow(Access::Read)?;
            q.tenant_id.clone()
        }
    };
    for (field, v) in [("tenant_id", &tenant_id), ("env", &q.env)] {
        if let Some(v) = v {
            cellplane_api::validate_id(v).map_err(|e| ApiError::field(field, e.to_string()))?;
        }
    }
    Ok(Json(
        crate::usage::report(
            s.service.store(),
            crate::usage::UsageQuery {
                tenant_id: tenant_id.as_deref(),
                env: q.env.as_deref(),
                meter: q.meter.as_deref(),
                from: q.from.as_deref(),
                to: q.to.as_deref(),
                granularity: q.granularity.as_deref(),
            },
        )
        .await?,
    ))
}

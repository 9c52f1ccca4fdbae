//! `/v1/controllers`: which replica runs each controller, at which term.

use super::error::ApiResult;
use super::AppState;
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::{Extension, Json};
use cellplane_api::{ControllerInfo, Page, Problem};

#[utoipa::path(get, path = "/v1/controllers", tag = "operations",
    responses((status = 200, body = Page<ControllerInfo>), (status = 401, body = Problem),
              (status = 403, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Page<ControllerInfo>>> {
    p.allow(Access::Read)?;
    let leases = s
        .service
        .store()
        .list_controller_leases()
        .await
        .map_err(crate::service::ServiceError::from)?;
    Ok(Json(Page {
        items: leases
            .into_iter()
            .map(|l| ControllerInfo {
                this_replica: l.live && l.holder == s.replica,
                name: l.name,
                holder: l.holder,
                term: l.term,
                expires_at: l.expires_at,
                acquired_at: l.acquired_at,
                renewed_at: l.renewed_at,
                live: l.live,
            })
            .collect(),
        next_cursor: None,
    }))
}

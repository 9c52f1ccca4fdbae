//! `/v1/templates`: the cell templates found in the template directory.

use super::error::ApiResult;
use super::extract::PathParams;
use super::AppState;
use crate::auth::{Access, Principal};
use axum::extract::State;
use axum::{Extension, Json};
use cellplane_api::{Page, Problem, TemplateInfo};

#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = Page<TemplateInfo>)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Page<TemplateInfo>>> {
    p.allow(Access::Read)?;
    Ok(Json(Page {
        items: s.service.list_templates()?,
        next_cursor: None,
    }))
}

#[utoipa::path(get, path = "/v1/templates/{template}", tag = "templates",
    params(("template" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<TemplateInfo>> {
    let name = path.id("template")?;
    p.allow(Access::Read)?;
    Ok(Json(s.service.get_template(&name)?))
}

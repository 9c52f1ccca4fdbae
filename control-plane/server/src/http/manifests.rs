//! `POST /v1/apply` (manifests, with a plan) and `GET /v1/manifests/{kind}/{name}`.

use super::error::{ApiError, ApiResult};
use super::extract::{media_type, read_body, ApiQuery, PathParams};
use super::{ctx, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use crate::service::{ApplyOptions, ApplyOutcome};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use cellplane_api::manifests::Kind;
use cellplane_api::{ApplyResult, Document, FieldError, Problem};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ApplyParams {
    /// Plan only: nothing is stored and no audit record is written.
    pub dry_run: Option<bool>,
    /// Store the documents that can be stored and report the rest (default: all or none).
    pub partial: Option<bool>,
}

/// The answer of an all-or-nothing apply that refused something: 409 with each refusal.
fn refused(result: &ApplyResult) -> ApiError {
    let errors: Vec<FieldError> = result
        .objects
        .iter()
        .filter_map(|o| {
            let r = o.refusal.as_ref().filter(|r| r.blocking)?;
            Some(FieldError {
                field: format!("documents[{}]", o.index),
                message: format!(
                    "{} {}: {}: {}",
                    o.kind.as_str(),
                    o.name,
                    r.reason,
                    r.message
                ),
            })
        })
        .collect();
    let mut e = ApiError::conflict(format!(
        "nothing was applied: {} document(s) refused ({})",
        errors.len(),
        errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    e.errors = errors;
    e
}

#[utoipa::path(post, path = "/v1/apply", tag = "manifests", params(ApplyParams),
    request_body(
        description = "A JSON list of documents, or a YAML stream (`Content-Type: application/yaml`, documents separated by `---`)",
        content((Vec<Document> = "application/json"), (String = "application/yaml"))),
    responses((status = 200, body = ApplyResult), (status = 400, body = Problem),
        (status = 409, body = Problem), (status = 413, body = Problem),
        (status = 415, body = Problem)))]
pub async fn apply(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    ApiQuery(q): ApiQuery<ApplyParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<ApplyResult>> {
    p.allow(Access::Write)?;
    let mime = media_type(&headers);
    let yaml = matches!(
        mime.as_str(),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml"
    );
    let json = mime == "application/json" || mime.ends_with("+json");
    if !yaml && !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "unsupported media type",
            "send the documents as application/json (a list) or application/yaml",
        ));
    }
    let bytes = read_body(body, s.max_apply_bytes).await?;
    let (values, mut errors) = if yaml {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::field("body", "YAML must be UTF-8"))?;
        crate::manifests::read_yaml(text)
    } else {
        crate::manifests::read_json(&bytes)
    };
    let (docs, typing) = crate::manifests::type_documents(values);
    errors.extend(typing);
    let opts = ApplyOptions {
        dry_run: q.dry_run.unwrap_or(false),
        partial: q.partial.unwrap_or(false),
    };
    match s.service.apply(&ctx(&p, &c), docs, errors, opts).await? {
        ApplyOutcome::Done(r) => Ok(Json(r)),
        ApplyOutcome::Refused(r) => Err(refused(&r)),
    }
}

#[utoipa::path(get, path = "/v1/manifests/{kind}/{name}", tag = "manifests",
    params(("kind" = String, Path, description = "organization, regionpolicy, cell or tenant"),
        ("name" = String, Path)),
    responses((status = 200, body = Document), (status = 400, body = Problem),
        (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Document>> {
    let kind_raw = path
        .0
        .iter()
        .find(|(k, _)| k == "kind")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let kind = Kind::parse_lower(&kind_raw).ok_or_else(|| {
        ApiError::field("kind", "must be organization, regionpolicy, cell or tenant")
    })?;
    let name = path.id("name")?;
    match (kind, p.tenant_scope()) {
        (Kind::Tenant, Some(own)) if own == name => {}
        (_, Some(_)) => return Err(ApiError::not_found("no such resource")),
        _ => p.allow(Access::Read)?,
    }
    Ok(Json(s.service.export(kind, &name).await?))
}

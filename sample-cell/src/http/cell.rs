//! The cell contract (`/cell/v1/tenants/{tenant}/…`): export, import, freeze, unfreeze,
//! checksum and purge, used by the control plane to move tenants.
//!
//! Every route here is behind the admin token (see `require_admin`). The handlers only
//! parse and delegate: streaming, batching and digests live in `service`. They must never
//! buffer an export or an import body whole.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{ApiQuery, AppState, PathTenant};
use crate::contract::Cursor;
use crate::error::ApiError;
use crate::service::{self, ChecksumReport, ImportSummary};
use crate::store::Flags;

#[derive(Deserialize)]
pub(super) struct ExportQuery {
    since: Option<String>,
}

pub(super) async fn export(
    State(state): State<AppState>,
    PathTenant(tenant): PathTenant,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let since = match query.since.as_deref() {
        None => Cursor::START,
        Some(raw) => raw
            .parse::<Cursor>()
            .map_err(|e| ApiError::BadRequest(format!("since: {e}")))?,
    };
    tracing::info!(tenant_id = %tenant, since = %since, "export started");
    let stream = service::export(&state.store, &tenant, since).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(stream),
    )
        .into_response())
}

pub(super) async fn import(
    State(state): State<AppState>,
    PathTenant(tenant): PathTenant,
    body: Body,
) -> Result<Json<ImportSummary>, ApiError> {
    let summary = service::import(&state.store, &tenant, body.into_data_stream())
        .await
        .inspect_err(|err| tracing::warn!(tenant_id = %tenant, error = %err, "import failed"))?;
    tracing::info!(
        tenant_id = %tenant,
        applied = summary.applied,
        skipped = summary.skipped,
        "import finished"
    );
    Ok(Json(summary))
}

#[derive(Serialize)]
pub(super) struct FreezeResponse {
    tenant_id: String,
    frozen: bool,
    /// Change-feed position at the time of the call: after a freeze, an export `since`
    /// an earlier cursor up to this one is the tenant's final delta.
    cursor: String,
}

impl FreezeResponse {
    fn new(tenant_id: String, flags: Flags) -> Self {
        let cursor = Cursor {
            epoch: Some(flags.epoch),
            seq: flags.last_seq,
        };
        Self {
            tenant_id,
            frozen: flags.frozen,
            cursor: cursor.to_string(),
        }
    }
}

pub(super) async fn freeze(
    State(state): State<AppState>,
    PathTenant(tenant): PathTenant,
) -> Result<Json<FreezeResponse>, ApiError> {
    let flags = state.store.set_frozen(&tenant, true).await?;
    tracing::info!(tenant_id = %tenant, cursor_seq = flags.last_seq, "tenant frozen");
    Ok(Json(FreezeResponse::new(tenant.to_string(), flags)))
}

pub(super) async fn unfreeze(
    State(state): State<AppState>,
    PathTenant(tenant): PathTenant,
) -> Result<Json<FreezeResponse>, ApiError> {
    let flags = state.store.set_frozen(&tenant, false).await?;
    tracing::info!(tenant_id = %tenant, "tenant unfrozen");
    Ok(Json(FreezeResponse::new(tenant.to_string(), flags)))
}

pub(super) async fn checksum(
    State(state): State<AppState>,
    PathTenant(tenant): PathTenant,
) -> Result<Json<ChecksumReport>, ApiError> {
    Ok(Json(service::checksum(&state.store, &tenant).await?))
}

#[derive(Serialize)]
pub(super) struct PurgeResponse {
    tenant_id: String,
    /// Rows and tombstones removed.
    purged_rows: u64,
}

pub(super) async fn purge(
    State(state): State<AppState>,
    PathTenant(tenant): PathTenant,
) -> Result<Json<PurgeResponse>, ApiError> {
    let purged = state.store.purge(&tenant).await?;
    tracing::info!(tenant_id = %tenant, rows = purged.rows, "tenant purged");
    Ok(Json(PurgeResponse {
        tenant_id: tenant.to_string(),
        purged_rows: purged.rows,
    }))
}

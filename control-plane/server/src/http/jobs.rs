//! `/v1/jobs`

use super::error::{ApiError, ApiResult};
use super::extract::{decode_cursor, limit_of, page, ApiQuery, PathParams};
use super::{ctx, AppState, CorrelationId};
use crate::auth::{Access, Principal};
use crate::service::tenant_target;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cellplane_api::{Job, JobState, Page, Problem};
use serde::Deserialize;
use std::convert::Infallible;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// `tenant/<id>` or `cell/<id>`.
    pub target: Option<String>,
    pub state: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

fn valid_target(t: &str) -> bool {
    match t.split_once('/') {
        Some(("tenant" | "cell", id)) => cellplane_api::validate_id(id).is_ok(),
        _ => false,
    }
}

/// Tenant-admins see only jobs of their own tenant; others are hidden.
fn check_job_access(p: &Principal, job: &Job) -> ApiResult<()> {
    match p.tenant_scope() {
        Some(t) if job.target == tenant_target(t) => Ok(()),
        Some(_) => Err(ApiError::not_found("no such resource")),
        None => Ok(p.allow(Access::Read)?),
    }
}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = Page<Job>), (status = 400, body = Problem)))]
pub async fn list(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Job>>> {
    let mut target = q.target;
    if let Some(t) = &target {
        if !valid_target(t) {
            return Err(ApiError::field(
                "target",
                "must be tenant/<id> or cell/<id>",
            ));
        }
    }
    match p.tenant_scope() {
        Some(own) => {
            let own_target = tenant_target(own);
            if target.as_deref().is_some_and(|t| t != own_target) {
                return Err(ApiError::not_found("no such resource"));
            }
            target = Some(own_target);
        }
        None => p.allow(Access::Read)?,
    }
    if let Some(st) = &q.state {
        JobState::parse(st).ok_or_else(|| ApiError::field("state", "is not a job state"))?;
    }
    let limit = limit_of(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    let items = s
        .service
        .list_jobs(target.as_deref(), q.state.as_deref(), &after, limit + 1)
        .await?;
    Ok(Json(page(items, limit, |j| j.job_id.clone())))
}

#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs", params(("job_id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = Problem)))]
pub async fn get_one(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Json<Job>> {
    let id = path.id("job_id")?;
    if p.tenant_scope().is_none() {
        p.allow(Access::Read)?;
    }
    let job = s.service.get_job(&id).await?;
    check_job_access(&p, &job)?;
    Ok(Json(job))
}

#[utoipa::path(get, path = "/v1/jobs/{job_id}/log", tag = "jobs", params(("job_id" = String, Path)),
    responses((status = 200, body = String, content_type = "text/plain"), (status = 404, body = Problem)))]
pub async fn log(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Response> {
    let id = path.id("job_id")?;
    if p.tenant_scope().is_none() {
        p.allow(Access::Read)?;
    }
    let job = s.service.get_job(&id).await?;
    check_job_access(&p, &job)?;
    let text = s.service.job_log(&id).await?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

#[utoipa::path(post, path = "/v1/jobs/{job_id}/cancel", tag = "jobs", params(("job_id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    Extension(c): Extension<CorrelationId>,
    path: PathParams,
) -> ApiResult<Json<Job>> {
    let id = path.id("job_id")?;
    if p.tenant_scope().is_none() {
        p.allow(Access::Write)?;
    }
    let job = s.service.get_job(&id).await?;
    check_job_access(&p, &job)?;
    Ok(Json(s.service.cancel_job(&ctx(&p, &c), &id).await?))
}

/// What a live follower has already been sent.
struct Follow {
    service: crate::service::Service,
    id: String,
    seen_log: i64,
    last: Option<(f64, Option<String>, JobState)>,
    queue: std::collections::VecDeque<Event>,
    done: bool,
}

#[utoipa::path(get, path = "/v1/jobs/{job_id}/events", tag = "jobs", params(("job_id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream",
        description = "Server-sent events until the job ends: `progress` ({state, progress, step}), \
                       `log` (one log line each) and a final `end` (the job)"),
              (status = 404, body = Problem)))]
pub async fn events(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    path: PathParams,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>> {
    let id = path.id("job_id")?;
    if p.tenant_scope().is_none() {
        p.allow(Access::Read)?;
    }
    let job = s.service.get_job(&id).await?;
    check_job_access(&p, &job)?;
    let follow = Follow {
        service: s.service.clone(),
        id,
        seen_log: 0,
        last: None,
        queue: Default::default(),
        done: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        loop {
            if let Some(e) = f.queue.pop_front() {
                return Some((Ok(e), f));
            }
            if f.done {
                return None;
            }
            // Registered before the read, so a change right after it still wakes us:
            // this process's jobs wake followers at once; other replicas' are polled.
            let changed = f.service.job_changed();
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (job, log, total) = match f.service.store().job_with_log(&f.id).await {
                Ok(Some(v)) => v,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "following a job failed");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            };
            let new = (total - f.seen_log).max(0) as usize;
            if new > 0 {
                let mut start = log.len().saturating_sub(new);
                while !log.is_char_boundary(start) {
                    start += 1;
                }
                for line in log[start..].lines() {
                    f.queue
                        .push_back(Event::default().event("log").data(line.replace('\r', "")));
                }
                f.seen_log = total;
            }
            let j = job.job;
            let now = (j.progress, j.step.clone(), j.state);
            if f.last.as_ref() != Some(&now) {
                let data = serde_json::json!({"job_id": j.job_id, "state": j.state,
                    "progress": j.progress, "step": j.step});
                f.queue
                    .push_back(Event::default().event("progress").data(data.to_string()));
                f.last = Some(now);
            }
            if j.state.is_terminal() {
                let data = serde_json::to_string(&j).unwrap_or_default();
                f.queue.push_back(Event::default().event("end").data(data));
                f.done = true;
            }
            if f.queue.is_empty() {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_millis(250), notified.as_mut())
                        .await;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

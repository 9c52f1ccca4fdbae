//! The admin listener: `GET /__router/healthz` and `GET /__router/metrics`, apart from
//! tenant traffic so a tenant can never reach them.

use crate::proxy::RouterState;
use crate::sync::SyncStatus;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::fmt::Write as _;
use std::sync::Arc;

/// Bodies of admin responses.
pub type Body = Full<Bytes>;

fn text(status: StatusCode, ct: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

pub fn handle(
    state: &RouterState,
    status: &Arc<SyncStatus>,
    router_id: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/__router/healthz") => {
            let snap = state.table.load();
            let mut down: Vec<&str> = snap
                .cells
                .iter()
                .filter(|c| !c.health.is_up())
                .map(|c| &*c.cell_id)
                .collect();
            down.sort_unstable();
            let body = serde_json::json!({
                "status": "ok",
                "router_id": router_id,
                "revision": snap.revision,
                "routes": snap.routes,
                "cells": snap.cells.len(),
                "cells_down": down,
                "source": status.source_name(),
                "control_plane_last_ok_ms_ago": status.since_last_ok_ms(),
                "state_file_revision": state
                    .persisted_revision
                    .load(std::sync::atomic::Ordering::Relaxed),
            });
            text(StatusCode::OK, "application/json", body.to_string())
        }
        ("GET", "/__router/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(state, status),
        ),
        _ => {
            let body = serde_json::json!({
                "type": "https://cellplane.dev/problems/not-found",
                "title": "not found", "status": 404,
                "detail": "the admin listener serves /__router/healthz and /__router/metrics",
            });
            text(
                StatusCode::NOT_FOUND,
                "application/problem+json",
                body.to_string(),
            )
        }
    }
}

pub fn render_metrics(state: &RouterState, status: &SyncStatus) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let snap = state.table.load_full();
    let mut out = String::with_capacity(16 * 1024);
    let _ = writeln!(
        out,
        "# HELP cellplane_router_revision Routing table revision being served.\n# TYPE cellplane_router_revision gauge\ncellplane_router_revision {}",
        snap.revision
    );
    let _ = writeln!(
        out,
        "# HELP cellplane_router_routes Routes in the table.\n# TYPE cellplane_router_routes gauge\ncellplane_router_routes {}",
        snap.routes
    );
    let _ = writeln!(
        out,
        "# HELP cellplane_router_control_plane_last_ok_seconds Seconds since the control plane last answered a watch (-1: never).\n# TYPE cellplane_router_control_plane_last_ok_seconds gauge\ncellplane_router_control_plane_last_ok_seconds {}",
        status
            .since_last_ok_ms()
            .map(|m| m as f64 / 1000.0)
            .unwrap_or(-1.0)
    );
    state.counters.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP cellplane_router_resyncs_total Times the router found it had not run for longer than its lease and fenced its table until it fetched it again.\n# TYPE cellplane_router_resyncs_total counter\ncellplane_router_resyncs_total {}",
        state.fence.trips.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP cellplane_router_resync_needed Whether served routes wait for the routing table to be fetched again (the rejoin fence is up).\n# TYPE cellplane_router_resync_needed gauge\ncellplane_router_resync_needed {}",
        u8::from(state.fence.resync_needed())
    );
    out.push_str("# HELP cellplane_router_cell_up Whether the cell passes its health checks (1) or not (0).\n# TYPE cellplane_router_cell_up gauge\n");
    for c in snap.cells.iter() {
        let _ = writeln!(
            out,
            "cellplane_router_cell_up{{cell=\"{}\"}} {}",
            c.cell_id,
            u8::from(c.health.is_up())
        );
    }
    out.push_str("# HELP cellplane_router_cell_requests_total Forwarded requests by cell and status class.\n# TYPE cellplane_router_cell_requests_total counter\n");
    for c in snap.cells.iter() {
        c.status.render(
            &mut out,
            "cellplane_router_cell_requests_total",
            &format!("cell=\"{}\"", c.cell_id),
        );
    }
    out.push_str("# HELP cellplane_router_cell_request_duration_seconds Time to the response head by cell.\n# TYPE cellplane_router_cell_request_duration_seconds histogram\n");
    for c in snap.cells.iter() {
        c.latency.render(
            &mut out,
            "cellplane_router_cell_request_duration_seconds",
            &format!("cell=\"{}\"", c.cell_id),
        );
    }
    // Tenants appear once they have had traffic.
    let mut tenants = Vec::new();
    snap.each_tenant(|t, e| {
        if let Some(rt) = e.runtime.get() {
            if rt.status.total() > 0 || rt.held_requests.load(Relaxed) > 0 {
                tenants.push((t.to_string(), rt.clone()));
            }
        }
    });
    tenants.sort_by(|a, b| a.0.cmp(&b.0));
    out.push_str("# HELP cellplane_router_tenant_requests_total Requests by tenant and status class.\n# TYPE cellplane_router_tenant_requests_total counter\n");
    for (t, rt) in &tenants {
        rt.status.render(
            &mut out,
            "cellplane_router_tenant_requests_total",
            &format!("tenant=\"{t}\""),
        );
    }
    out.push_str("# HELP cellplane_router_tenant_held_requests_total Requests that waited on a held route of the tenant (or on the rejoin fence), counted when the wait ended.\n# TYPE cellplane_router_tenant_held_requests_total counter\n");
    for (t, rt) in &tenants {
        let n = rt.held_requests.load(Relaxed);
        if n > 0 {
            let _ = writeln!(
                out,
                "cellplane_router_tenant_held_requests_total{{tenant=\"{t}\"}} {n}"
            );
        }
    }
    out.push_str("# HELP cellplane_router_tenant_hold_seconds_total Time the tenant's requests spent waiting on held routes (or on the rejoin fence).\n# TYPE cellplane_router_tenant_hold_seconds_total counter\n");
    for (t, rt) in &tenants {
        if rt.held_requests.load(Relaxed) > 0 {
            let _ = writeln!(
                out,
                "cellplane_router_tenant_hold_seconds_total{{tenant=\"{t}\"}} {}",
                rt.held_micros.load(Relaxed) as f64 / 1e6
            );
        }
    }
    out.push_str("# HELP cellplane_router_tenant_request_duration_seconds Time to the response head by tenant.\n# TYPE cellplane_router_tenant_request_duration_seconds histogram\n");
    for (t, rt) in &tenants {
        let Some(latency) = &rt.latency else {
            continue;
        };
        latency.render(
            &mut out,
            "cellplane_router_tenant_request_duration_seconds",
            &format!("tenant=\"{t}\""),
        );
    }
    out
}

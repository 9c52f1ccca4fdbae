//! The authorization gate: which access every route needs, checked right after the token is
//! resolved and before anything of the request is read (path identifiers, query, headers
//! such as `If-Match` and `Idempotency-Key`, the body). A caller who may not use a route
//! learns nothing about its input schema: it gets 401, 403, or 404 where the resource is
//! another tenant's, never a validation error.
//!
//! Handlers keep their own checks of the objects they load (a tenant-admin's jobs, the
//! admin-only `force`); this gate must never be looser than they are.

use super::error::ApiError;
use crate::auth::{Access, Principal};
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// What a route needs from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A route that is not about one tenant: [`Principal::allow`].
    Role(Access),
    /// A route about the tenant in the `{tenant_id}` path segment:
    /// [`Principal::allow_tenant`] (another tenant is hidden as 404).
    Tenant(Access),
    /// Tenant-admins pass (the handler narrows what they see to their tenant, and a
    /// malformed path id, which cannot name anything of theirs, is hidden as 404); other
    /// callers need `Access`.
    OwnTenantOr(Access),
    /// The router role, or read access (one route of the routing table).
    RouterOrRead,
}

/// The access matrix by route: `(method, matched path)`. `None` means the method is not
/// routed at that path (a unit test holds this table to the OpenAPI document, which a
/// test holds to the router).
pub fn need(method: &Method, path: &str) -> Option<Need> {
    use Access::{Admin, Read, Router, Write};
    let m = if *method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let get = m == Method::GET;
    let post = m == Method::POST;
    let patch = m == Method::PATCH;
    let put = m == Method::PUT;
    let delete = m == Method::DELETE;
    Some(match path {
        "/v1/organizations" if post => Need::Role(Write),
        "/v1/organizations" | "/v1/organizations/{organization_id}" if get => Need::Role(Read),
        "/v1/tenants" if post => Need::Role(Write),
        "/v1/tenants" if get => Need::OwnTenantOr(Read),
        "/v1/tenants/{tenant_id}" | "/v1/tenants/{tenant_id}/environments" if get => {
            Need::Tenant(Read)
        }
        "/v1/tenants/{tenant_id}" if patch => Need::Tenant(Write),
        "/v1/tenants/{tenant_id}/environments" | "/v1/tenants/{tenant_id}/{action}" if post => {
            Need::Tenant(Write)
        }
        "/v1/tenants/{tenant_id}/move" if post => Need::Role(Write),
        "/v1/moves" | "/v1/moves/{move_id}" if get => Need::OwnTenantOr(Read),
        "/v1/apply" if post => Need::Role(Write),
        "/v1/releases" | "/v1/releases/{release_id}/{action}" if post => Need::Role(Write),
        "/v1/releases" | "/v1/releases/{release_id}" if get => Need::Role(Read),
        "/v1/manifests/{kind}/{name}" if get => Need::OwnTenantOr(Read),
        "/v1/cells" | "/v1/cells/{cell_id}" if get => Need::Role(Read),
        "/v1/cells" if post => Need::Role(Write),
        "/v1/cells/{cell_id}" if patch || delete => Need::Role(Write),
        "/v1/cells/{cell_id}/drain" | "/v1/cells/{cell_id}/apply" | "/v1/cells/{cell_id}/plan"
            if post =>
        {
            Need::Role(Write)
        }
        "/v1/cells/{cell_id}/metrics" if get => Need::Role(Read),
        "/v1/templates" | "/v1/templates/{template}" if get => Need::Role(Read),
        "/v1/jobs" | "/v1/jobs/{job_id}" | "/v1/jobs/{job_id}/log" | "/v1/jobs/{job_id}/events"
            if get =>
        {
            Need::OwnTenantOr(Read)
        }
        "/v1/jobs/{job_id}/cancel" if post => Need::OwnTenantOr(Write),
        "/v1/routes" if get => Need::Role(Router),
        "/v1/routes/history" if get => Need::Role(Read),
        "/v1/routes/{tenant_id}/{env}" if get => Need::RouterOrRead,
        "/v1/routes/{tenant_id}/{env}" if patch => Need::Role(Write),
        "/v1/routers" if get => Need::Role(Read),
        "/v1/controllers" if get => Need::Role(Read),
        "/v1/routers/{router_id}/heartbeat" if post => Need::Role(Router),
        "/v1/regions" | "/v1/regions/{region}" if get => Need::Role(Read),
        "/v1/regions/{region}" if put => Need::Role(Write),
        "/v1/audit" if get => Need::OwnTenantOr(Read),
        "/v1/events" if get => Need::OwnTenantOr(Read),
        "/v1/usage" if get => Need::OwnTenantOr(Read),
        "/v1/webhooks" | "/v1/webhooks/{webhook_id}" | "/v1/webhooks/{webhook_id}/deliveries"
            if get =>
        {
            Need::OwnTenantOr(Read)
        }
        "/v1/webhooks" if post => Need::OwnTenantOr(Write),
        "/v1/webhooks/{webhook_id}" if patch || delete => Need::OwnTenantOr(Write),
        "/v1/webhooks/{webhook_id}/rotate-secret"
        | "/v1/webhooks/{webhook_id}/test"
        | "/v1/webhooks/{webhook_id}/replay"
        | "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
            if post =>
        {
            Need::OwnTenantOr(Write)
        }
        "/v1/audit/verify" if get => Need::Role(Read),
        "/v1/tokens" if get || post => Need::Role(Admin),
        "/v1/tokens/{token_id}" if delete => Need::Role(Admin),
        _ => return None,
    })
}

/// Decides `need` for `p`; `params` are the raw path parameters of the request.
pub fn check(p: &Principal, need: Need, params: &[(String, String)]) -> Result<(), ApiError> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match need {
        Need::Role(access) => Ok(p.allow(access)?),
        Need::Tenant(access) => {
            // Routed only at paths with the segment; an empty one names no tenant.
            let tenant = param("tenant_id").unwrap_or("");
            Ok(p.allow_tenant(tenant, access)?)
        }
        Need::OwnTenantOr(access) => match p.tenant_scope() {
            Some(_) => {
                if params
                    .iter()
                    .any(|(_, v)| cellplane_api::validate_id(v).is_err())
                {
                    return Err(ApiError::not_found("no such resource"));
                }
                Ok(())
            }
            None => Ok(p.allow(access)?),
        },
        Need::RouterOrRead => {
            if p.allow(Access::Router).is_ok() {
                Ok(())
            } else {
                Ok(p.allow(Access::Read)?)
            }
        }
    }
}

/// Middleware on every `/v1` route, after authentication and before idempotent replay.
pub async fn gate(req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let Some(route) = parts.extensions.get::<MatchedPath>().cloned() else {
        // Only routed requests reach route layers; anything else is a server bug.
        return ApiError::internal_logged("a request reached the gate unrouted", &parts.uri)
            .into_response();
    };
    let Some(principal) = parts.extensions.get::<Principal>().cloned() else {
        return ApiError::internal_logged(
            "a request reached the gate unauthenticated",
            &route.as_str(),
        )
        .into_response();
    };
    let Some(need) = need(&parts.method, route.as_str()) else {
        return super::method_not_allowed().await.into_response();
    };
    let params: Vec<(String, String)> =
        match RawPathParams::from_request_parts(&mut parts, &()).await {
            Ok(raw) => raw
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            // A segment that is not UTF-8 names nothing; decide as if it were empty.
            Err(_) => Vec::new(),
        };
    if let Err(e) = check(&principal, need, &params) {
        return e.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::Role;
    use utoipa::OpenApi;

    /// Every documented operation (the OpenAPI document is held to the router by the
    /// conventions test) has an entry, so no route is reachable without the gate deciding.
    #[test]
    fn every_v1_operation_has_an_access_rule() {
        let doc = super::super::openapi::ApiDoc::openapi();
        let json = serde_json::to_value(&doc).expect("the document serializes");
        let paths = json["paths"].as_object().expect("paths");
        let mut checked = 0;
        for (path, ops) in paths {
            if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
                continue;
            }
            for method in ops.as_object().expect("operations").keys() {
                let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                    .expect("an HTTP method");
                assert!(need(&m, path).is_some(), "{m} {path} has no access rule");
                checked += 1;
            }
        }
        assert!(checked > 30, "only {checked} operations found");
    }

    fn p(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            token_id: "t".into(),
            role,
            tenant_id: tenant.map(str::to_string),
        }
    }

    fn params(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tenant_admins_reach_only_their_tenant_and_never_validation() {
        let ta = p(Role::TenantAdmin, Some("acme"));
        let own = params(&[("tenant_id", "acme")]);
        let other = params(&[("tenant_id", "globex")]);
        let bad = params(&[("tenant_id", "NOT AN ID")]);
        assert!(check(&ta, Need::Tenant(Access::Write), &own).is_ok());
        assert_eq!(
            check(&ta, Need::Tenant(Access::Write), &other)
                .map_err(|e| e.status.as_u16())
                .err(),
            Some(404)
        );
        assert_eq!(
            check(&ta, Need::Tenant(Access::Write), &bad)
                .map_err(|e| e.status.as_u16())
                .err(),
            Some(404)
        );
        assert_eq!(
            check(&ta, Need::Role(Access::Write), &[])
                .map_err(|e| e.status.as_u16())
                .err(),
            Some(403)
        );
        let job = params(&[("job_id", "J_1")]);
        assert_eq!(
            check(&ta, Need::OwnTenantOr(Access::Write), &job)
                .map_err(|e| e.status.as_u16())
                .err(),
            Some(404)
        );
        let viewer = p(Role::Viewer, None);
        assert_eq!(
            check(&viewer, Need::OwnTenantOr(Access::Write), &job)
                .map_err(|e| e.status.as_u16())
                .err(),
            Some(403)
        );
        let router = p(Role::Router, None);
        assert!(check(&router, Need::RouterOrRead, &[]).is_ok());
        assert!(check(&viewer, Need::RouterOrRead, &[]).is_ok());
        assert!(check(&ta, Need::RouterOrRead, &[]).is_err());
    }
}

//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from
//! the routes (a test compares it with the router).

use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, Object, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, Schema, Type,
};
use utoipa::{Modify, OpenApi};

/// Every path identifier (tenant, organization, cell, region, environment, template,
/// router, and the generated job and token ids) is checked against this at the edge.
pub const ID_PATTERN: &str = "^[a-z][a-z0-9-]{1,62}$";
/// Job ids are `persistence::new_id("job")`: the prefix, 12 hex digits of milliseconds and
/// 10 random characters. They also pass [`ID_PATTERN`], which is what the edge checks.
pub const JOB_ID_PATTERN: &str = "^job-[0-9a-f]{12}[0-9a-z]{10}$";
/// Token ids are `persistence::new_id("tok")`, or `admin` for the bootstrap token.
pub const WEBHOOK_ID_PATTERN: &str = "^wh-[0-9a-f]{12}[0-9a-z]{10}$";
/// Webhook delivery ids are `persistence::new_id("dlv")`.
pub const DELIVERY_ID_PATTERN: &str = "^dlv-[0-9a-f]{12}[0-9a-z]{10}$";
/// Move ids are `persistence::new_id("mv")`.
pub const MOVE_ID_PATTERN: &str = "^mv-[0-9a-f]{12}[0-9a-z]{10}$";
pub const TOKEN_ID_PATTERN: &str = "^(admin|tok-[0-9a-f]{12}[0-9a-z]{10})$";

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "cellplane control plane", description = "Cell-based tenancy control plane API (v1)"),
    modifiers(&BearerAuth, &EdgeResponses),
    security(("bearer" = [])),
    paths(
        super::organizations::create, super::organizations::list, super::organizations::get_one,
        super::tenants::create, super::tenants::list, super::tenants::get_one, super::tenants::patch,
        super::tenants::action, super::tenants::create_environment, super::tenants::list_environments,
        super::moves::create, super::moves::list, super::moves::get_one,
        super::manifests::apply, super::manifests::get_one,
        super::releases::create, super::releases::list, super::releases::get_one,
        super::releases::action,
        super::cells::create, super::cells::list, super::cells::get_one, super::cells::patch,
        super::cells::drain, super::cells::delete, super::cells::apply, super::cells::plan,
        super::cells::metrics,
        super::templates::list, super::templates::get_one,
        super::jobs::list, super::jobs::get_one, super::jobs::log, super::jobs::events,
        super::jobs::cancel,
        super::routes::watch, super::routes::history, super::routes::get_one, super::routes::patch,
        super::routes::heartbeat, super::routes::list_routers, super::controllers::list,
        super::routes::list_regions, super::routes::get_region, super::routes::put_region,
        super::audit::list, super::audit::verify, super::events::list,
        super::webhooks::create, super::webhooks::list, super::webhooks::get_one,
        super::webhooks::patch, super::webhooks::delete, super::webhooks::rotate_secret,
        super::webhooks::test, super::webhooks::deliveries, super::webhooks::redeliver,
        super::webhooks::replay, super::usage::report,
        super::tokens::create, super::tokens::list, super::tokens::revoke,
        super::ops::healthz, super::ops::readyz, super::ops::metrics, super::ops::openapi,
    ),
    components(schemas(cellplane_api::Problem, cellplane_api::FieldError))
)]
pub struct ApiDoc;

/// What the edge does to every request, written into each operation so the handlers'
/// annotations need only say what is particular to them: errors are
/// `application/problem+json`; an authenticated route may answer 401, 403 and 404
/// (a resource hidden from a tenant-admin), 429 on writes; anything with input may answer
/// 400; a JSON body may be refused with 413 or 415; every `POST` accepts `Idempotency-Key`
/// (422 when a key is reused with another request). Path ids carry their pattern.
struct EdgeResponses;

fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

fn string_schema(pattern: Option<&str>, min: Option<usize>, max: Option<usize>) -> Object {
    let mut b = ObjectBuilder::new().schema_type(Type::String);
    if let Some(p) = pattern {
        b = b.pattern(Some(p));
    }
    b.min_length(min).max_length(max).build()
}

fn idempotency_key() -> Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "replay protection: the first successful answer is replayed for the same key and \
             request; 1 to 255 visible ASCII characters",
        ))
        .schema(Some(string_schema(
            Some("^[!-~]{1,255}$"),
            Some(1),
            Some(255),
        )))
        .build()
}

fn edge_operation(path: &str, method: &str, op: &mut Operation) {
    let authenticated = path.starts_with("/v1/") && path != "/v1/openapi.json";
    let params = op.parameters.get_or_insert_with(Vec::new);
    if authenticated && method == "post" && !params.iter().any(|p| p.name == "Idempotency-Key") {
        params.push(idempotency_key());
    }
    for p in params.iter_mut() {
        match (&p.parameter_in, p.name.as_str()) {
            (ParameterIn::Path, "action") => {
                let actions = ["activate", "suspend", "resume", "archive", "delete"];
                p.schema = Some(RefOr::T(Schema::Object(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(actions))
                        .build(),
                )));
            }
            (ParameterIn::Path, "job_id") => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(JOB_ID_PATTERN),
                    None,
                    None,
                ))));
                p.description =
                    Some("a job id as the server issues it: `job-` and 22 characters".into());
            }
            (ParameterIn::Path, "webhook_id") => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(WEBHOOK_ID_PATTERN),
                    None,
                    None,
                ))));
                p.description =
                    Some("a webhook id as the server issues it: `wh-` and 22 characters".into());
            }
            (ParameterIn::Path, "delivery_id") => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(DELIVERY_ID_PATTERN),
                    None,
                    None,
                ))));
                p.description =
                    Some("a delivery id as the server issues it: `dlv-` and 22 characters".into());
            }
            (ParameterIn::Path, "move_id") => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(MOVE_ID_PATTERN),
                    None,
                    None,
                ))));
                p.description =
                    Some("a move id as the server issues it: `mv-` and 22 characters".into());
            }
            (ParameterIn::Path, "token_id") => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(TOKEN_ID_PATTERN),
                    None,
                    None,
                ))));
                p.description = Some(
                    "a token id: `admin` (the bootstrap token) or `tok-` and 22 characters".into(),
                );
            }
            (ParameterIn::Path, _) => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(ID_PATTERN),
                    Some(2),
                    Some(63),
                ))));
            }
            (ParameterIn::Header, "If-Match") => {
                p.schema = Some(RefOr::T(Schema::Object(string_schema(
                    Some(r#"^(\*|(W/)?"[1-9][0-9]{0,17}")$"#),
                    None,
                    None,
                ))));
                if p.description.is_none() {
                    p.description = Some("the expected version, quoted (`\"3\"`), or `*`".into());
                }
            }
            (ParameterIn::Header, "Idempotency-Key") => {
                let description = p.description.take();
                *p = idempotency_key();
                if let Some(d) = description {
                    p.description = Some(format!("{d}; 1 to 255 visible ASCII characters"));
                }
            }
            _ => {}
        }
    }
    let has_input = !params.is_empty() || op.request_body.is_some();
    let has_if_match = params.iter().any(|p| p.name == "If-Match");
    let idempotent = params.iter().any(|p| p.name == "Idempotency-Key");
    let json_body = op
        .request_body
        .as_ref()
        .is_some_and(|b| b.content.keys().any(|k| k.ends_with("json")));
    let write = matches!(method, "post" | "put" | "patch" | "delete");
    let responses = &mut op.responses.responses;
    for (status, response) in responses.iter_mut() {
        if !status.starts_with('4') && !status.starts_with('5') {
            continue;
        }
        if let RefOr::T(r) = response {
            if let Some(c) = r.content.shift_remove("application/json") {
                r.content.insert("application/problem+json".into(), c);
            }
        }
    }
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(problem(description)));
    };
    if has_input {
        add(
            "400",
            "the request is malformed: a field, a query parameter, a path id or a header",
        );
    }
    if authenticated {
        add("401", "no valid bearer token");
        add("403", "the token's role may not do this");
        add("404", "no such resource, or one hidden from this token");
    }
    if authenticated && write {
        add("409", "the request conflicts with the resource's state");
        add("429", "authoring rate limit exceeded; see Retry-After");
    }
    if json_body {
        add("413", "the request body is larger than the limit");
        add("415", "the body is not application/json");
    }
    if authenticated {
        add(
            "503",
            "the store or a dependency failed; retry after Retry-After",
        );
    }
    if has_if_match {
        add("412", "If-Match does not name the current version");
    }
    if idempotent {
        add(
            "422",
            "the Idempotency-Key was used before with a different request",
        );
    }
}

impl Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, op) in [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("patch", &mut item.patch),
                ("delete", &mut item.delete),
            ] {
                if let Some(op) = op.as_mut() {
                    edge_operation(path, method, op);
                }
            }
        }
    }
}

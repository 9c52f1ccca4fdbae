//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from
//! the routes (a test compares it with the router).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

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
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    paths(
        super::organizations::create, super::organizations::list, super::organizations::get_one,
        super::tenants::create, super::tenants::list, super::tenants::get_one, super::tenants::patch,
        super::tenants::action, super::tenants::create_environment, super::tenants::list_environments,
        super::cells::create, super::cells::list, super::cells::get_one, super::cells::patch,
        super::cells::drain, super::cells::delete, super::cells::apply, super::cells::plan,
        super::templates::list, super::templates::get_one,
        super::jobs::list, super::jobs::get_one, super::jobs::log, super::jobs::events,
        super::jobs::cancel,
        super::routes::watch, super::routes::history, super::routes::get_one, super::routes::patch,
        super::routes::heartbeat, super::routes::list_routers, super::controllers::list,
        super::routes::list_regions, super::routes::get_region, super::routes::put_region,
        super::audit::list, super::audit::verify,
        super::tokens::create, super::tokens::list, super::tokens::revoke,
        super::ops::healthz, super::ops::readyz, super::ops::metrics, super::ops::openapi,
    ),
    components(schemas(cellplane_api::Problem, cellplane_api::FieldError))
)]
pub struct ApiDoc;

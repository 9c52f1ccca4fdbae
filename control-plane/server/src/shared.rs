//! What the service, the job engine and the controllers share: the store, the settings,
//! placement, routing and the in-process wake-ups. Built once at startup; cheap to clone.
//! Job steps reach the registry through this, never through the service, so the service
//! (which enqueues jobs) and the jobs (which place and route) do not import each other.

use crate::iac::Catalog;
use crate::persistence::Store;
use crate::placement::Placement;
use crate::routing::{RevisionWatch, Routing};
use std::sync::Arc;
use tokio::sync::Notify;

/// Settings the service, the job engine and the controllers need from the configuration.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub job_max_attempts: i64,
    /// How long a waiting job step may wait, for kinds that set no limit of their own.
    pub job_wait_secs: u64,
    /// How soon a waiting job step looks again at first.
    pub job_wait_poll_ms: u64,
    pub routing: crate::config::RoutingConfig,
    pub placement: crate::config::PlacementConfig,
    /// The cell template directory.
    pub templates: Catalog,
    /// Ports handed to cells (`source = "port"` variables).
    pub port_range: (u16, u16),
    /// The CloudEvents `source` of published events.
    pub event_source: String,
    /// Webhook destinations may be private addresses (tests, development).
    pub webhooks_allow_private: bool,
    /// Encrypts webhook secrets; none when no key is configured (PostgreSQL without
    /// `webhooks.secret_key`): subscriptions are then refused with 503.
    pub webhook_secrets: Option<crate::webhooks::SecretBox>,
    /// How long a rotated-out webhook secret keeps signing.
    pub webhook_rotation_grace_secs: u64,
    pub moves: crate::config::MovesConfig,
    pub metrics: crate::config::MetricsConfig,
}

#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub settings: Arc<ServiceSettings>,
    pub placement: Placement,
    pub routing: Routing,
    /// Woken when a job is enqueued or becomes due, so idle workers claim it at once.
    pub job_notify: Arc<Notify>,
    /// Woken whenever a job of this process records progress or ends, so live followers
    /// (server-sent events) need not wait for their poll.
    pub job_changed: Arc<Notify>,
    /// Woken when a desired spec changes (an apply, an imperative change): the tenant
    /// controller looks at once.
    pub desired_changed: Arc<Notify>,
    /// Calls the cell contract (tenant moves).
    pub cells: crate::cellclient::CellClient,
    /// Where release gates read cells' traffic.
    pub metrics: crate::metrics::Providers,
}

impl Shared {
    pub fn new(store: Store, settings: ServiceSettings) -> Self {
        let placement = Placement::new(
            store.clone(),
            settings.templates.clone(),
            settings.placement.clone(),
        );
        let routing = Routing::new(store.clone(), settings.routing.clone());
        let cells = crate::cellclient::CellClient::new(
            std::time::Duration::from_secs(settings.moves.copy_timeout_secs.max(1)),
            std::time::Duration::from_millis(settings.moves.call_timeout_ms.max(100)),
        );
        let metrics = crate::metrics::Providers::new(routing.clone(), &settings.metrics);
        Self {
            cells,
            metrics,
            store,
            settings: Arc::new(settings),
            placement,
            routing,
            job_notify: Arc::new(Notify::new()),
            job_changed: Arc::new(Notify::new()),
            desired_changed: Arc::new(Notify::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The routing revision as last seen by this process.
    pub fn route_revisions(&self) -> &RevisionWatch {
        self.routing.revisions()
    }
}

//! End-to-end tests of the control plane through its real binary, on SQLite and on
//! PostgreSQL. One test binary; one module per concern.

mod audit;
mod authz;
mod aws;
mod bad_input;
mod cli;
mod conventions;
mod delivery;
mod docs;
mod engine;
mod events;
mod gates;
mod hardening;
mod jobs;
mod layers;
mod lifecycle;
mod manifests;
mod moves;
mod placement;
mod releases;
mod replicas;
mod router;
mod routing;
mod stamping;
mod store;
mod usage;
mod webhooks;

//! sample-cell: the reference tenant-aware workload that every local cellplane cell runs.
//!
//! It serves a tenant-scoped key-value API (`/v1/kv`) and the cell contract
//! (`/cell/v1/…`: export, import, freeze, checksum, purge) that the control plane uses to
//! move tenants, plus probes and Prometheus metrics that rollout gates read. It is also a
//! library so tests can start it in-process on port 0 through [`Application`].

pub mod config;
pub mod contract;
pub mod error;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use startup::Application;

//! `cellplane-router`: the data plane. It resolves each request's tenant, looks the tenant
//! up in one atomically swapped snapshot of the routing table and forwards the request to
//! the tenant's cell over a per-cell keep-alive pool. The table comes from a long-poll
//! watch on the control plane and is mirrored to a state file, so the router keeps serving
//! (also across its own restart) while the control plane is down.
//!
//! This crate must never link the control-plane server crate: it shares only the wire
//! types of `cellplane-api`. `main.rs` only wires.

pub mod admin;
pub mod config;
pub mod forward;
pub mod h1;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod resolve;
pub mod startup;
pub mod state;
pub mod sync;
pub mod table;
pub mod upstream;
pub mod usage;
pub mod wire;

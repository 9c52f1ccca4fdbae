//! The cellplane control plane: registry, lifecycle jobs, audit chain, HTTP API and CLI.
//! `main.rs` only wires these modules together.

pub mod auth;
pub mod cellclient;
pub mod cli;
pub mod clock;
pub mod config;
pub mod controllers;
pub mod ctx;
pub mod down;
pub mod error;
pub mod events;
pub mod failpoints;
pub mod gates;
pub mod http;
pub mod iac;
pub mod jobs;
pub mod local_router;
pub mod manifests;
pub mod metrics;
pub mod persistence;
pub mod placement;
pub mod routing;
pub mod secret;
pub mod service;
pub mod shared;
pub mod stamping;
pub mod startup;
pub mod telemetry;
pub mod usage;
pub mod validate;
pub mod webhooks;

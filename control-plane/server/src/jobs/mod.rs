//! Durable jobs: one module per job kind, one registration line each in [`kinds`], and a
//! kind-agnostic [`engine`] that claims, leases, retries, waits and ends them.
//!
//! A kind ([`Kind`]) has a typed spec (its payload), a typed state persisted with the job,
//! the resources it holds from enqueue to end, its steps, and what its end means for its
//! targets — including the compensation that undoes its steps when it fails or is
//! cancelled. Nothing outside a kind's own file looks at its kind string.
//!
//! This module never opens a transaction of its own for a registry change except through a
//! kind's step or finish; it never runs SQL itself (persistence does).

mod cell;
pub mod cell_apply;
pub mod cell_destroy;
pub mod cell_drain;
pub mod cell_plan;
pub mod cell_stamp;
mod engine;
mod kind;
pub mod move_request;
#[cfg(any(debug_assertions, feature = "bench-kinds"))]
pub mod noop;
pub mod release_gates;
pub mod release_rollout;
mod tenant;
pub mod tenant_activate;
pub mod tenant_archive;
pub mod tenant_delete;
pub mod tenant_move;
pub mod tenant_place;
pub mod tenant_resume;
pub mod tenant_suspend;
#[cfg(debug_assertions)]
pub mod test_hold;

pub use cell::{
    enqueue_cell_job, patch_cell_in, prepare_cell, register_cell, register_cell_in, user_vars_of,
    CellSpec, PreparedCell,
};
pub use engine::{backoff_for, CancellationToken, JobEngine, JobMetrics, Shutdown};
pub use kind::{enqueue, DynKind, End, FinishCx, Finished, Kind, Next, StepCx, StepError};
pub use tenant::{lifecycle_kind, TenantSpec};

use std::sync::OnceLock;

/// Every job kind this build runs.
pub fn kinds() -> &'static [&'static dyn DynKind] {
    static KINDS: OnceLock<Vec<&'static dyn DynKind>> = OnceLock::new();
    KINDS.get_or_init(|| {
        #[allow(unused_mut)]
        let mut kinds: Vec<&'static dyn DynKind> = vec![
            &tenant_activate::TenantActivate,
            &tenant_suspend::TenantSuspend,
            &tenant_resume::TenantResume,
            &tenant_archive::TenantArchive,
            &tenant_delete::TenantDelete,
            &tenant_place::TenantPlace,
            &tenant_move::TenantMove,
            &tenant_move::TenantMovePurge,
            &cell_stamp::CellStamp,
            &cell_apply::CellApply,
            &cell_destroy::CellDestroy,
            &cell_drain::CellDrain,
            &release_rollout::ReleaseRollout,
            &cell_plan::CellPlan,
        ];
        #[cfg(debug_assertions)]
        kinds.push(&test_hold::TestHold);
        #[cfg(any(debug_assertions, feature = "bench-kinds"))]
        kinds.push(&noop::Noop);
        kinds
    })
}

/// The kind registered under `name`.
pub fn kind(name: &str) -> Option<&'static dyn DynKind> {
    kinds().iter().copied().find(|k| k.name() == name)
}

/// The lock name of a tenant.
pub fn tenant_resource(tenant_id: &str) -> String {
    format!("tenant/{tenant_id}")
}

/// The lock name of a cell.
pub fn cell_resource(cell_id: &str) -> String {
    format!("cell/{cell_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_registered_once_with_their_steps() {
        let mut names: Vec<&str> = kinds().iter().map(|k| k.name()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a kind is registered twice");
        for k in kinds() {
            assert!(!k.step_names().is_empty(), "{} has no steps", k.name());
        }
        for a in cellplane_api::LifecycleAction::ALL {
            assert!(kind(lifecycle_kind(a).name()).is_some());
        }
        assert!(kind("nope").is_none());
    }
}

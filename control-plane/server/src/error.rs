//! The errors of operations, whoever runs them (an API call, a job step, a controller):
//! each with a kind that the HTTP edge maps to a status (404, 409, 412, 400, 503) and
//! that a job maps to retry or give up. Store errors pass through unless they mean a
//! conflict (a resource held by another job).

use crate::persistence::StoreError;
use cellplane_api::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{what} {id:?} does not exist")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("the resource is at version {current}, not the one in If-Match")]
    PreconditionFailed { current: i64 },
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    /// A controller's write carried a term whose lease another replica has taken.
    #[error("{0}")]
    Fenced(String),
    /// A dependency of the operation (template directory, the host) failed.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            // A job could not take what it needs: someone else's job holds it.
            StoreError::Locked { resource, job_id } => {
                ServiceError::Conflict(format!("{resource} is held by job {job_id}"))
            }
            other => ServiceError::Store(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;

pub fn invalid(field: &str, message: impl Into<String>) -> ServiceError {
    ServiceError::Validation(vec![FieldError {
        field: field.into(),
        message: message.into(),
    }])
}

pub fn not_found(what: &'static str, id: &str) -> ServiceError {
    ServiceError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// `If-Match`: the version the caller read must still be the current one.
pub fn check_version(expected: Option<i64>, current: i64) -> Result<()> {
    match expected {
        Some(v) if v != current => Err(ServiceError::PreconditionFailed { current }),
        _ => Ok(()),
    }
}

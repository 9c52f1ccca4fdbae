//! Who acts ([`Ctx`]) and the names of the targets that jobs and audit records carry.
//! Every layer records them, so they sit below all of them.

/// Who acts and under which correlation id; recorded on audit records and jobs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub actor: String,
    pub correlation_id: String,
}

/// The target of a tenant's jobs and audit records.
pub fn tenant_target(id: &str) -> String {
    format!("tenant/{id}")
}
pub fn cell_target(id: &str) -> String {
    format!("cell/{id}")
}

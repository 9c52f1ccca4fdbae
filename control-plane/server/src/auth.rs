//! Who is calling and what they may do. Handlers ask [`Principal`] before they touch the
//! service; the role matrix lives here and nowhere else.

use cellplane_api::Role;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: String,
    pub role: Role,
    /// Set for tenant-admin tokens: the one tenant they may see and change.
    pub tenant_id: Option<String>,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read registry data.
    Read,
    /// Change registry data (tenants, cells, organizations, jobs).
    Write,
    /// Mint and revoke tokens: admins only.
    Admin,
    /// The router's routes: read routes and heartbeat.
    Router,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The caller may not use this route at all (403).
    Forbidden(&'static str),
    /// The resource belongs to another tenant; hidden as if it did not exist (404).
    Hidden,
}

impl Principal {
    /// An actor string for audit records.
    pub fn actor(&self) -> String {
        match &self.tenant_id {
            Some(t) => format!("token:{}({}:{})", self.token_id, self.role.as_str(), t),
            None => format!("token:{}({})", self.token_id, self.role.as_str()),
        }
    }

    /// Checks a route that is not about one tenant (cells, organizations, tokens, lists).
    pub fn allow(&self, access: Access) -> Result<(), Denied> {
        let ok = matches!(
            (self.role, access),
            (Role::Admin, _)
                | (
                    Role::Operator,
                    Access::Read | Access::Write | Access::Router
                )
                | (Role::Viewer, Access::Read)
                | (Role::Router, Access::Router)
        );
        if ok {
            Ok(())
        } else {
            Err(Denied::Forbidden(match access {
                Access::Read => "this token may not read this resource",
                Access::Write => "this token may not change this resource",
                Access::Admin => "only admin tokens may manage tokens",
                Access::Router => "this token may not use the routing API",
            }))
        }
    }

    /// Checks a route about one tenant: tenant-admins reach only their own tenant, and
    /// another tenant is hidden (404) so its existence does not leak.
    pub fn allow_tenant(&self, tenant_id: &str, access: Access) -> Result<(), Denied> {
        if self.role == Role::TenantAdmin {
            return match (&self.tenant_id, access) {
                (Some(own), Access::Read | Access::Write) if own == tenant_id => Ok(()),
                (Some(own), _) if own != tenant_id => Err(Denied::Hidden),
                _ => Err(Denied::Forbidden("tenant-admin tokens may not do this")),
            };
        }
        self.allow(access)
    }

    /// Tenant-admins list only their own tenant.
    pub fn tenant_scope(&self) -> Option<&str> {
        match self.role {
            Role::TenantAdmin => self.tenant_id.as_deref(),
            _ => None,
        }
    }
}

/// Recently resolved tokens, so a request does not pay a store round trip to authenticate.
/// Entries live for `ttl`; revoking a token clears the cache of this process at once, and
/// other replicas stop accepting it within `ttl`.
pub struct TokenCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (Principal, std::time::Instant)>>,
}

impl TokenCache {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: Default::default(),
        }
    }

    pub fn get(&self, token_hash: &str) -> Option<Principal> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(token_hash)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(p, _)| p.clone())
    }

    pub fn put(&self, token_hash: String, p: Principal) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() > 10_000 {
            entries.clear();
        }
        entries.insert(token_hash, (p, std::time::Instant::now()));
    }

    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new secret: `cp_` and 43 url-safe random characters (256 bits).
pub fn new_secret() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!(
        "cp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, t: Option<&str>) -> Principal {
        Principal {
            token_id: "t".into(),
            role,
            tenant_id: t.map(str::to_string),
        }
    }

    #[test]
    fn matrix() {
        let viewer = p(Role::Viewer, None);
        assert!(viewer.allow(Access::Read).is_ok());
        assert!(viewer.allow(Access::Write).is_err());
        let op = p(Role::Operator, None);
        assert!(op.allow(Access::Write).is_ok());
        assert!(op.allow(Access::Admin).is_err());
        let router = p(Role::Router, None);
        assert!(router.allow(Access::Router).is_ok());
        assert!(router.allow(Access::Read).is_err());
        let ta = p(Role::TenantAdmin, Some("acme"));
        assert!(ta.allow_tenant("acme", Access::Write).is_ok());
        assert_eq!(ta.allow_tenant("globex", Access::Read), Err(Denied::Hidden));
        assert!(ta.allow(Access::Read).is_err());
    }
}

//! Validated identifiers that cross the HTTP boundary: tenant ids, keys and key prefixes.
//!
//! Every user-supplied name is parsed into one of these types before it reaches the store,
//! so the rest of the crate can assume a well-formed value. This module must never accept
//! a value outside its documented charset, and it never touches I/O.

use std::fmt;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Why an identifier was refused; the message is safe to show to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("tenant id must match ^[a-z][a-z0-9-]{{1,62}}$")]
    Tenant,
    #[error("key must be 1..=256 bytes of [A-Za-z0-9._:-]")]
    Key,
    #[error("prefix must be 0..=256 bytes of [A-Za-z0-9._:-]")]
    Prefix,
}

/// A tenant id: `^[a-z][a-z0-9-]{1,62}$`, the registry's identifier rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if is_identifier(raw) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::Tenant)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identifier rule shared by tenant and cell ids: `^[a-z][a-z0-9-]{1,62}$`.
pub fn is_identifier(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    (2..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// A key: 1..=256 bytes of `[A-Za-z0-9._:-]`. ASCII only, so byte order is string order
/// on both stores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if (1..=MAX_KEY_LEN).contains(&raw.len()) && raw.bytes().all(is_key_byte) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::Key)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A key prefix for listing; the empty prefix matches every key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prefix(String);

impl Prefix {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.len() <= MAX_KEY_LEN && raw.bytes().all(is_key_byte) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(IdError::Prefix)
        }
    }

    /// The half-open key range `[lower, upper)` holding exactly the keys with this prefix,
    /// or `None` for the empty prefix. Every key byte is below `0x7f`, so incrementing the
    /// last byte stays valid ASCII and sorts right after every extension of the prefix.
    pub fn range(&self) -> Option<(String, String)> {
        let last = *self.0.as_bytes().last()?;
        let mut upper = self.0[..self.0.len() - 1].to_owned();
        upper.push(char::from(last + 1));
        Some((self.0.clone(), upper))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_follow_the_registry_rule() {
        for ok in ["ab", "acme", "a-1", &format!("a{}", "b".repeat(62))] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            "1abc",
            "Acme",
            "ac_me",
            "acme ",
            "-acme",
            "ac/me",
            &format!("a{}", "b".repeat(63)),
        ] {
            assert_eq!(TenantId::parse(bad), Err(IdError::Tenant), "{bad:?}");
        }
    }

    #[test]
    fn keys_use_a_safe_charset() {
        for ok in ["a", "user:42.profile_v-1", &"k".repeat(256)] {
            assert!(Key::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ä", "a%2f", &"k".repeat(257)] {
            assert_eq!(Key::parse(bad), Err(IdError::Key), "{bad:?}");
        }
    }

    #[test]
    fn prefix_range_covers_exactly_the_extensions() {
        assert_eq!(Prefix::parse("").expect("empty prefix").range(), None);
        let (lower, upper) = Prefix::parse("user:z")
            .expect("valid prefix")
            .range()
            .expect("non-empty prefix");
        assert_eq!(lower, "user:z");
        assert_eq!(upper, "user:{");
        for inside in ["user:z", "user:z-", "user:zzzz", "user:z~"] {
            assert!(
                inside >= lower.as_str() && inside < upper.as_str(),
                "{inside}"
            );
        }
        for outside in ["user:y", "user:", "user;"] {
            assert!(!(outside >= lower.as_str() && outside < upper.as_str()));
        }
    }
}

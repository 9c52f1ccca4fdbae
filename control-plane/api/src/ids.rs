//! Validated identifiers. Every tenant, organization, cell, template and environment name
//! matches `^[a-z][a-z0-9-]{1,62}$`, so an id can never become a path, a shell word or HCL.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be 2 to 63 characters long")]
    Length,
    #[error("must start with a lowercase ascii letter")]
    Start,
    #[error("may contain only lowercase ascii letters, digits and '-'")]
    Charset,
}

/// Checks `^[a-z][a-z0-9-]{1,62}$`.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return Err(IdError::Empty);
    }
    if !bytes[0].is_ascii_lowercase() {
        return Err(IdError::Start);
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(IdError::Charset);
    }
    if bytes.len() < 2 || bytes.len() > 63 {
        return Err(IdError::Length);
    }
    Ok(())
}

/// An identifier that has passed [`validate_id`]. Deserializing validates too, so a typed
/// request body can never carry an invalid id past the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, pattern = "^[a-z][a-z0-9-]{1,62}$")]
pub struct Id(String);

impl Id {
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        validate_id(&s)?;
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::parse(s)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::parse(s.clone()).map_err(|e| serde::de::Error::custom(format!("invalid id {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["ab", "acme", "euw1-pool-1", &format!("a{}", "b".repeat(62))] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            "A",
            "Acme",
            "1abc",
            "-abc",
            "../etc",
            "a/b",
            "a_b",
            "añb",
            "a b",
            &format!("a{}", "b".repeat(63)),
        ] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}

//! [`Secret`]: a configuration value (a token, a database URL with its password, a
//! provider credential) that must never reach a log line or an error message. It sits
//! below both the configuration and the IaC runner, which hands secrets to subprocesses.

use serde::Deserialize;
use std::fmt;

/// A value that must never reach a log line.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

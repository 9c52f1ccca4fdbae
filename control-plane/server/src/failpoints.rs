//! Named failpoints: crash and failure tests stop a job at a chosen step instead of sleeping
//! and hoping to land there. A failpoint is a name such as `tenant.activate/place` (before
//! the step `place` of an activation runs) or `tenant.activate/place/after` (after the step's
//! effect committed, before the job records it), and for cell jobs the terraform phases
//! (`cell.stamp/apply`, `cell.stamp/outputs/after`, …).
//!
//! They are configured with `CELLPLANE__JOBS__FAILPOINTS` as `name=action[@attempt];…` and
//! honoured only in debug builds: a release build ignores the setting (and says so once).
//! Actions: `kill` (SIGKILL this process), `error` (a retryable failure), `fatal` (a
//! failure that is not retried), `wait` (the step waits, as for a cell still stamping),
//! `pause` (the step blocks until the job is cancelled or the process stops), `stop`
//! (SIGSTOP this process; it goes on where it stopped when a test sends SIGCONT). With
//! `@N` the failpoint fires only on the job's N-th attempt, so a test that kills the process
//! at a step sees the restarted process go past it.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    Error,
    Fatal,
    Wait,
    Pause,
    /// SIGSTOP this process (a test resumes it with SIGCONT): a pause at a named step
    /// that a lease outlives.
    Stop,
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    action: Action,
    attempt: Option<i64>,
}

/// The configured failpoints; empty (and free) unless a debug build was given some.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    rules: Arc<HashMap<String, Rule>>,
}

#[derive(Debug, thiserror::Error)]
#[error("failpoint setting {0:?} is not name=kill|error|fatal|wait|pause|stop[@attempt]")]
pub struct ParseError(String);

impl Failpoints {
    /// Parses `name=action[@attempt];…`. A release build returns an empty set.
    pub fn parse(spec: &str) -> Result<Self, ParseError> {
        let mut rules = HashMap::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, rest) = part
                .split_once('=')
                .ok_or_else(|| ParseError(part.to_string()))?;
            let (action, attempt) = match rest.split_once('@') {
                Some((a, n)) => (
                    a,
                    Some(
                        n.trim()
                            .parse::<i64>()
                            .map_err(|_| ParseError(part.to_string()))?,
                    ),
                ),
                None => (rest, None),
            };
            let action = match action.trim() {
                "kill" => Action::Kill,
                "error" => Action::Error,
                "fatal" => Action::Fatal,
                "wait" => Action::Wait,
                "pause" => Action::Pause,
                "stop" => Action::Stop,
                _ => return Err(ParseError(part.to_string())),
            };
            rules.insert(name.trim().to_string(), Rule { action, attempt });
        }
        if !cfg!(debug_assertions) {
            if !rules.is_empty() {
                tracing::warn!("failpoints are ignored in release builds");
            }
            return Ok(Self::default());
        }
        Ok(Self {
            rules: Arc::new(rules),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The action configured for `name` on this attempt, if any. `kill` never returns.
    pub fn hit(&self, name: &str, attempt: i64) -> Option<Action> {
        if self.rules.is_empty() {
            return None;
        }
        let rule = self.rules.get(name)?;
        if rule.attempt.is_some_and(|a| a != attempt) {
            return None;
        }
        tracing::warn!(failpoint = name, action = ?rule.action, attempt, "failpoint hit");
        if rule.action == Action::Kill {
            kill_self();
        }
        if rule.action == Action::Stop {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            tracing::warn!(failpoint = name, "resumed after SIGSTOP");
        }
        Some(rule.action)
    }
}

fn kill_self() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    // SIGKILL cannot be caught; this is not reached.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_actions_and_attempts() {
        let f = Failpoints::parse("tenant.activate/place=error@2; cell.stamp/apply=pause").unwrap();
        assert_eq!(f.hit("tenant.activate/place", 1), None);
        assert_eq!(f.hit("tenant.activate/place", 2), Some(Action::Error));
        assert_eq!(f.hit("cell.stamp/apply", 7), Some(Action::Pause));
        assert_eq!(f.hit("cell.stamp/plan", 1), None);
        assert!(Failpoints::parse("x=explode").is_err());
        assert!(Failpoints::parse("x").is_err());
        assert!(Failpoints::parse("").unwrap().is_empty());
    }
}

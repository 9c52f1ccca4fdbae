//! SLO maths for release gates, pure functions of counts: error ratio, a latency percentile
//! from histogram buckets, burn rate and the multi-window multi-burn-rate rule, the remaining
//! error budget, a canary-against-baseline comparison (Mann-Whitney U), and how a series of
//! measurements turns into a decision (failure, consecutive-error and inconclusive limits).
//! No I/O: the metrics providers produce [`Window`]s, the rollout decides with these.

/// What a window of one cell's (or a wave's) traffic holds: requests, those that failed
/// (5xx), and the latency histogram as cumulative `(upper bound in seconds, count)` pairs,
/// ending with `+Inf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub total: u64,
    pub errors: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl Window {
    /// Two windows as one (the same cell seen by several routers, or a wave's cells).
    /// Buckets are merged by bound; both must use the same bounds.
    pub fn merge(&self, other: &Window) -> Window {
        let buckets = if self.buckets.is_empty() {
            other.buckets.clone()
        } else if other.buckets.is_empty() {
            self.buckets.clone()
        } else {
            self.buckets
                .iter()
                .zip(&other.buckets)
                .map(|((le, a), (_, b))| (*le, a + b))
                .collect()
        };
        Window {
            total: self.total + other.total,
            errors: self.errors + other.errors,
            buckets,
        }
    }
}

/// Failed requests over all requests; `None` without requests.
pub fn error_ratio(w: &Window) -> Option<f64> {
    (w.total > 0).then(|| w.errors as f64 / w.total as f64)
}

/// The `q` quantile (0..=1) of a cumulative histogram, interpolated linearly inside the
/// bucket it falls in, as Prometheus' `histogram_quantile` does. A quantile in the `+Inf`
/// bucket is the highest finite bound. `None` without observations.
pub fn percentile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total as f64;
    let mut prev_bound = 0.0;
    let mut prev_count = 0u64;
    for &(le, count) in buckets {
        if count as f64 >= rank {
            if le.is_infinite() {
                return Some(prev_bound);
            }
            let in_bucket = (count - prev_count) as f64;
            if in_bucket == 0.0 {
                return Some(le);
            }
            return Some(prev_bound + (le - prev_bound) * (rank - prev_count as f64) / in_bucket);
        }
        prev_bound = if le.is_finite() { le } else { prev_bound };
        prev_count = count;
    }
    Some(prev_bound)
}

/// How fast the error budget burns: the error ratio over the ratio the SLO allows
/// (`1 - target`). 1.0 spends the budget exactly over the SLO period.
pub fn burn_rate(error_ratio: f64, slo_target: f64) -> f64 {
    let allowed = (1.0 - slo_target).max(f64::EPSILON);
    error_ratio / allowed
}

/// One multi-window burn-rate rule: alert when both the long and the short window burn
/// faster than `factor` (the SRE workbook: 14.4 over 1 h with a 5 min window, 6 over 6 h
/// with 30 min).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurnRule {
    pub long_secs: u64,
    pub short_secs: u64,
    pub factor: f64,
}

impl BurnRule {
    pub const PAGE: BurnRule = BurnRule {
        long_secs: 3600,
        short_secs: 300,
        factor: 14.4,
    };
    pub const TICKET: BurnRule = BurnRule {
        long_secs: 6 * 3600,
        short_secs: 1800,
        factor: 6.0,
    };

    /// Whether the rule fires on these windows; `None` when a window has no requests.
    pub fn fires(&self, long: &Window, short: &Window, slo_target: f64) -> Option<bool> {
        let l = burn_rate(error_ratio(long)?, slo_target);
        let s = burn_rate(error_ratio(short)?, slo_target);
        Some(l > self.factor && s > self.factor)
    }
}

/// The fraction of the error budget left over a window (1.0: untouched, 0.0 or less:
/// spent). `None` without requests.
pub fn remaining_budget(w: &Window, slo_target: f64) -> Option<f64> {
    let allowed = (1.0 - slo_target).max(f64::EPSILON);
    Some(1.0 - error_ratio(w)? / allowed)
}

/// A one-sided Mann-Whitney U test that `canary` is stochastically greater than `baseline`
/// (e.g. latencies, or per-interval error ratios): returns `(u, z, p)` with the normal
/// approximation and tie correction. `None` when either sample is empty.
pub fn mann_whitney_greater(canary: &[f64], baseline: &[f64]) -> Option<(f64, f64, f64)> {
    let (n1, n2) = (canary.len(), baseline.len());
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let mut all: Vec<(f64, usize)> = canary
        .iter()
        .map(|v| (*v, 0))
        .chain(baseline.iter().map(|v| (*v, 1)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Average ranks over ties.
    let mut ranks = vec![0.0; all.len()];
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for r in ranks.iter_mut().take(j + 1).skip(i) {
            *r = rank;
        }
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        i = j + 1;
    }
    let r1: f64 = all
        .iter()
        .zip(&ranks)
        .filter(|((_, g), _)| *g == 0)
        .map(|(_, r)| r)
        .sum();
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let u = r1 - n1f * (n1f + 1.0) / 2.0;
    let mean = n1f * n2f / 2.0;
    let n = n1f + n2f;
    let var = n1f * n2f / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)).max(1.0));
    if var <= 0.0 {
        return Some((u, 0.0, 0.5));
    }
    // Continuity correction towards the mean.
    let z = (u - mean - 0.5) / var.sqrt();
    Some((u, z, 1.0 - normal_cdf(z)))
}

/// The standard normal distribution function (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// What one evaluation of a gate found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measurement {
    Success,
    Failure,
    /// Too little traffic to judge (below the minimum request count): never a success.
    Inconclusive,
    /// The metrics provider could not be asked.
    Error,
}

/// When a series of measurements stops a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Failures allowed before the gate fails (0: the first failure fails it).
    pub failure_limit: u32,
    /// Errors in a row that halt the release.
    pub consecutive_error_limit: u32,
    /// Inconclusive measurements allowed before the release pauses for a human.
    pub inconclusive_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            failure_limit: 0,
            consecutive_error_limit: 4,
            inconclusive_limit: 0,
        }
    }
}

/// What the measurements so far decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep baking.
    Continue,
    /// The gate failed: roll back.
    Fail,
    /// Too many inconclusive measurements: pause for a human.
    Pause,
    /// The provider keeps failing: halt.
    Halt,
}

/// Running counts of one gate's measurements during a bake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub successes: u32,
    pub failures: u32,
    pub inconclusive: u32,
    pub errors: u32,
    pub consecutive_errors: u32,
}

impl Tally {
    /// Counts one measurement and says what the series decides now.
    pub fn record(&mut self, m: Measurement, limits: &Limits) -> Verdict {
        match m {
            Measurement::Success => {
                self.successes += 1;
                self.consecutive_errors = 0;
            }
            Measurement::Failure => {
                self.failures += 1;
                self.consecutive_errors = 0;
            }
            Measurement::Inconclusive => {
                self.inconclusive += 1;
                self.consecutive_errors = 0;
            }
            Measurement::Error => {
                self.errors += 1;
                self.consecutive_errors += 1;
            }
        }
        if self.failures > limits.failure_limit {
            Verdict::Fail
        } else if self.consecutive_errors >= limits.consecutive_error_limit.max(1) {
            Verdict::Halt
        } else if self.inconclusive > limits.inconclusive_limit {
            Verdict::Pause
        } else {
            Verdict::Continue
        }
    }

    /// Whether the bake may end with this gate passed: at least one success and nothing
    /// that stops it. Inconclusive measurements never count as successes.
    pub fn passed(&self, limits: &Limits) -> bool {
        self.successes > 0
            && self.failures <= limits.failure_limit
            && self.inconclusive <= limits.inconclusive_limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(counts: &[(f64, u64)]) -> Vec<(f64, u64)> {
        counts.to_vec()
    }

    #[test]
    fn error_ratio_needs_requests() {
        assert_eq!(error_ratio(&Window::default()), None);
        let w = Window {
            total: 200,
            errors: 40,
            buckets: vec![],
        };
        assert_eq!(error_ratio(&w), Some(0.2));
    }

    #[test]
    fn percentiles_interpolate_inside_the_bucket() {
        // 100 requests: 50 under 10 ms, 40 more under 100 ms, 10 more under 1 s.
        let b = hist(&[(0.01, 50), (0.1, 90), (1.0, 100), (f64::INFINITY, 100)]);
        assert!((percentile(&b, 0.5).unwrap() - 0.01).abs() < 1e-9);
        // p90 is the top of the second bucket; p95 halfway into the third.
        assert!((percentile(&b, 0.9).unwrap() - 0.1).abs() < 1e-9);
        assert!((percentile(&b, 0.95).unwrap() - 0.55).abs() < 1e-9);
        // Everything above the last finite bound: that bound.
        let slow = hist(&[(0.1, 0), (0.25, 0), (f64::INFINITY, 10)]);
        assert_eq!(percentile(&slow, 0.99), Some(0.25));
        assert_eq!(percentile(&hist(&[(f64::INFINITY, 0)]), 0.5), None);
    }

    #[test]
    fn the_workbook_rules_fire_only_when_both_windows_burn() {
        let target = 0.999; // 0.1 % of requests may fail
        let w = |errors| Window {
            total: 10_000,
            errors,
            buckets: vec![],
        };
        // 2 % errors burns 20× the budget: over 14.4 in both windows.
        assert_eq!(BurnRule::PAGE.fires(&w(200), &w(200), target), Some(true));
        // The short window recovered: no page (the long one alone is history).
        assert_eq!(BurnRule::PAGE.fires(&w(200), &w(5), target), Some(false));
        // 0.8 % burns 8×: a ticket, not a page.
        assert_eq!(BurnRule::PAGE.fires(&w(80), &w(80), target), Some(false));
        assert_eq!(BurnRule::TICKET.fires(&w(80), &w(80), target), Some(true));
        assert_eq!(
            BurnRule::PAGE.fires(&Window::default(), &w(80), target),
            None
        );
        assert!((burn_rate(0.001, target) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn remaining_budget_goes_negative_when_overspent() {
        let w = Window {
            total: 1000,
            errors: 5,
            buckets: vec![],
        };
        assert!((remaining_budget(&w, 0.99).unwrap() - 0.5).abs() < 1e-9);
        let spent = Window {
            total: 1000,
            errors: 30,
            buckets: vec![],
        };
        assert!(remaining_budget(&spent, 0.99).unwrap() < 0.0);
    }

    #[test]
    fn mann_whitney_tells_a_slower_canary_from_noise() {
        let baseline: Vec<f64> = (0..30).map(|i| 10.0 + (i % 7) as f64).collect();
        let slower: Vec<f64> = (0..30).map(|i| 210.0 + (i % 7) as f64).collect();
        let (_, z, p) = mann_whitney_greater(&slower, &baseline).unwrap();
        assert!(z > 4.0 && p < 0.001, "z {z} p {p}");
        let same: Vec<f64> = (0..30).map(|i| 10.0 + ((i + 3) % 7) as f64).collect();
        let (_, _, p) = mann_whitney_greater(&same, &baseline).unwrap();
        assert!(p > 0.2, "p {p}");
        // Every value tied: no evidence either way.
        let (_, _, p) = mann_whitney_greater(&[1.0; 5], &[1.0; 5]).unwrap();
        assert!((p - 0.5).abs() < 0.2, "p {p}");
        assert_eq!(mann_whitney_greater(&[], &baseline), None);
    }

    #[test]
    fn normal_cdf_matches_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-2.326_348) - 0.01).abs() < 1e-6);
    }

    #[test]
    fn tallies_fail_halt_and_pause_at_their_limits() {
        let limits = Limits::default();
        let mut t = Tally::default();
        assert_eq!(t.record(Measurement::Success, &limits), Verdict::Continue);
        assert!(t.passed(&limits));
        assert_eq!(t.record(Measurement::Failure, &limits), Verdict::Fail);

        let mut t = Tally::default();
        for _ in 0..3 {
            assert_eq!(t.record(Measurement::Error, &limits), Verdict::Continue);
        }
        assert_eq!(t.record(Measurement::Error, &limits), Verdict::Halt);
        // A success in between resets the run of errors.
        let mut t = Tally::default();
        for m in [
            Measurement::Error,
            Measurement::Error,
            Measurement::Error,
            Measurement::Success,
            Measurement::Error,
        ] {
            assert_eq!(t.record(m, &limits), Verdict::Continue);
        }

        // Inconclusive never passes on its own, and pauses past its limit.
        let mut t = Tally::default();
        assert_eq!(t.record(Measurement::Inconclusive, &limits), Verdict::Pause);
        assert!(!t.passed(&limits));
        let lenient = Limits {
            inconclusive_limit: 2,
            ..limits
        };
        let mut t = Tally::default();
        assert_eq!(
            t.record(Measurement::Inconclusive, &lenient),
            Verdict::Continue
        );
        assert!(!t.passed(&lenient), "inconclusive is not a success");
    }

    #[test]
    fn windows_merge_by_bucket() {
        let a = Window {
            total: 10,
            errors: 1,
            buckets: vec![(0.1, 8), (f64::INFINITY, 10)],
        };
        let b = Window {
            total: 5,
            errors: 0,
            buckets: vec![(0.1, 5), (f64::INFINITY, 5)],
        };
        let m = a.merge(&b);
        assert_eq!((m.total, m.errors), (15, 1));
        assert_eq!(m.buckets, vec![(0.1, 13), (f64::INFINITY, 15)]);
        assert_eq!(Window::default().merge(&a), a);
    }
}

//! A release's gates measured once: per cell (error ratio, latency percentile, burn rate)
//! and per wave (canary against baseline), each a [`Measurement`] with the numbers behind
//! it. Reads go through the release's metrics provider; the maths is `crate::gates`.

use crate::gates::{self, BurnRule, Measurement, Window};
use crate::metrics::{MetricsProvider, Provider};
use cellplane_api::releases::{BaselineMetric, Gates};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// The per-cell gates a release turned on.
pub fn cell_gates(g: &Gates) -> Vec<&'static str> {
    let mut out = Vec::new();
    if g.max_error_ratio.is_some() {
        out.push("error_ratio");
    }
    if g.latency.is_some() {
        out.push("latency");
    }
    if g.burn_rate.is_some() {
        out.push("burn_rate");
    }
    out
}

/// One gate's measurement of one cell (or of a wave, for `baseline`).
pub struct Measured {
    pub gate: &'static str,
    pub result: Measurement,
    pub numbers: Value,
}

fn judge(enough: bool, bad: bool) -> Measurement {
    if !enough {
        Measurement::Inconclusive
    } else if bad {
        Measurement::Failure
    } else {
        Measurement::Success
    }
}

/// Requests slower than `threshold_ms` in a cumulative histogram: all but those in the
/// highest bucket bound at or under the threshold (so a threshold between bounds counts
/// the bucket it cuts as slow).
fn slower_than(w: &Window, threshold_ms: f64) -> u64 {
    let within = w
        .buckets
        .iter()
        .filter(|(le, _)| *le * 1000.0 <= threshold_ms)
        .map(|(_, n)| *n)
        .next_back()
        .unwrap_or(0);
    w.total.saturating_sub(within)
}

/// Every per-cell gate of `g` measured on each of `cells`: one batch read per window
/// (the gate window, and each burn-rate rule's long and short ones), whatever the number
/// of cells.
pub async fn measure_cells(
    p: &Provider<'_>,
    cells: &[String],
    g: &Gates,
    floor: DateTime<Utc>,
) -> Vec<(String, Measured)> {
    let window = g.window_secs.max(1) as u64;
    let provider = p.name();
    let error = |gate: &'static str, e: &crate::metrics::ProviderError| Measured {
        gate,
        result: Measurement::Error,
        numbers: json!({"provider": provider, "error": e.to_string()}),
    };
    let read = if g.max_error_ratio.is_some() || g.latency.is_some() || g.burn_rate.is_some() {
        Some(p.windows(cells, window, Some(floor)).await)
    } else {
        None
    };
    // Right after the cells settled no router may have reported twice yet: that is no
    // measurement of the cell (until a whole window has passed), not an inconclusive one.
    let young = Utc::now() - floor < chrono::Duration::seconds(window as i64);
    let not_yet = |cell: &str| match &read {
        Some(Ok(all)) => young && all.get(cell).is_none_or(|r| r.sources == 0),
        _ => false,
    };
    let burn = match &g.burn_rate {
        Some(b) => Some(measure_burn(p, cells, g, b, floor).await),
        None => None,
    };
    let mut out = Vec::new();
    for (k, cell) in cells.iter().enumerate() {
        if not_yet(cell) {
            continue;
        }
        match &read {
            None => {}
            Some(Err(e)) => {
                for gate in ["error_ratio", "latency"] {
                    if cell_gates(g).contains(&gate) {
                        out.push((cell.clone(), error(gate, e)));
                    }
                }
            }
            Some(Ok(all)) => {
                let r = all.get(cell).cloned().unwrap_or_default();
                let w = &r.window;
                let enough = w.total >= g.min_requests;
                if let Some(max) = g.max_error_ratio {
                    let ratio = gates::error_ratio(w);
                    out.push((
                        cell.clone(),
                        Measured {
                            gate: "error_ratio",
                            result: judge(enough, ratio.unwrap_or(0.0) > max),
                            numbers: json!({"provider": provider, "requests": w.total,
                                "errors": w.errors, "error_ratio": ratio, "max_error_ratio": max,
                                "min_requests": g.min_requests, "window_secs": window,
                                "sources": r.sources}),
                        },
                    ));
                }
                if let Some(l) = &g.latency {
                    let v = gates::percentile(&w.buckets, l.percentile).map(|s| s * 1000.0);
                    out.push((
                        cell.clone(),
                        Measured {
                            gate: "latency",
                            result: judge(enough, v.unwrap_or(0.0) > l.max_ms),
                            numbers: json!({"provider": provider, "requests": w.total,
                                "percentile": l.percentile, "value_ms": v, "max_ms": l.max_ms,
                                "min_requests": g.min_requests, "window_secs": window,
                                "sources": r.sources}),
                        },
                    ));
                }
            }
        }
        if let Some(burn) = &burn {
            if let Some(m) = burn.get(k) {
                out.push((
                    cell.clone(),
                    Measured {
                        gate: "burn_rate",
                        result: m.result,
                        numbers: m.numbers.clone(),
                    },
                ));
            }
        }
    }
    out
}

/// The multi-window burn rate of each cell (in the order of `cells`): each rule reads its
/// long and short window; a rule fires when both burn faster than its factor. Any rule
/// firing fails; a short window with fewer than `min_requests` requests is inconclusive.
async fn measure_burn(
    p: &Provider<'_>,
    cells: &[String],
    g: &Gates,
    b: &cellplane_api::releases::BurnRateGate,
    floor: DateTime<Utc>,
) -> Vec<Measured> {
    let mut windows = Vec::new();
    for spec in &b.rules {
        match (
            p.windows(cells, spec.long_secs, Some(floor)).await,
            p.windows(cells, spec.short_secs, Some(floor)).await,
        ) {
            (Ok(l), Ok(s)) => windows.push((spec, l, s)),
            (Err(e), _) | (_, Err(e)) => {
                let m = || Measured {
                    gate: "burn_rate",
                    result: Measurement::Error,
                    numbers: json!({"provider": p.name(), "error": e.to_string()}),
                };
                return cells.iter().map(|_| m()).collect();
            }
        }
    }
    // Bad requests: failed, or (with a latency threshold) slower than it.
    let bad = |w: &Window| {
        let slow = b
            .latency_threshold_ms
            .map(|t| slower_than(w, t))
            .unwrap_or(0);
        Window {
            total: w.total,
            errors: (w.errors + slow).min(w.total),
            buckets: Vec::new(),
        }
    };
    let rate = |w: &Window| gates::error_ratio(w).map(|r| gates::burn_rate(r, b.slo_target));
    cells
        .iter()
        .map(|cell| {
            let mut rules = Vec::new();
            let (mut fired, mut enough) = (false, true);
            for (spec, long, short) in &windows {
                let rule = BurnRule {
                    long_secs: spec.long_secs,
                    short_secs: spec.short_secs,
                    factor: spec.factor,
                };
                let l = bad(&long.get(cell).cloned().unwrap_or_default().window);
                let s = bad(&short.get(cell).cloned().unwrap_or_default().window);
                let fires = rule.fires(&l, &s, b.slo_target).unwrap_or(false);
                enough &= s.total >= g.min_requests;
                fired |= fires;
                rules.push(
                    json!({"long_secs": rule.long_secs, "short_secs": rule.short_secs,
                    "factor": rule.factor, "long_burn_rate": rate(&l),
                    "short_burn_rate": rate(&s), "long_requests": l.total,
                    "short_requests": s.total, "fires": fires}),
                );
            }
            Measured {
                gate: "burn_rate",
                // A rule that fires fails even if another rule lacks traffic.
                result: if fired {
                    Measurement::Failure
                } else {
                    judge(enough, false)
                },
                numbers: json!({"provider": p.name(), "slo_target": b.slo_target,
                    "latency_threshold_ms": b.latency_threshold_ms,
                    "min_requests": g.min_requests, "rules": rules}),
            }
        })
        .collect()
}

/// Canary against baseline for a wave: `None` when no cell is left on the old version
/// (recorded as `not_applicable` by the caller).
pub async fn measure_baseline(
    p: &Provider<'_>,
    canary: &[String],
    baseline: &[String],
    g: &Gates,
    floor: DateTime<Utc>,
) -> Option<Measured> {
    let b = g.baseline.as_ref()?;
    if baseline.is_empty() {
        return None;
    }
    let window = g.window_secs.max(1) as u64;
    let value = |w: &Window| match b.metric {
        BaselineMetric::ErrorRatio => gates::error_ratio(w),
        BaselineMetric::Latency => gates::percentile(&w.buckets, b.percentile),
    };
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for (side, cells) in [canary, baseline].into_iter().enumerate() {
        for cell in cells {
            match p.series(cell, window, b.step_secs, Some(floor)).await {
                Ok(steps) => samples[side].extend(steps.iter().filter_map(value)),
                Err(e) => {
                    return Some(Measured {
                        gate: "baseline",
                        result: Measurement::Error,
                        numbers: json!({"provider": p.name(), "error": e.to_string(), "cell_id": cell}),
                    })
                }
            }
        }
    }
    let [new, old] = samples;
    let enough = new.len() >= b.min_samples as usize && old.len() >= b.min_samples as usize;
    let test = gates::mann_whitney_greater(&new, &old);
    let alpha = 1.0 - b.confidence;
    let worse = test.is_some_and(|(_, _, p)| p < alpha);
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    Some(Measured {
        gate: "baseline",
        result: judge(enough, worse),
        numbers: json!({"provider": p.name(), "test": "mann-whitney-u (one-sided: new > old)",
            "metric": b.metric, "canary_cells": canary, "baseline_cells": baseline,
            "canary_samples": new.len(), "baseline_samples": old.len(),
            "canary_mean": mean(&new), "baseline_mean": mean(&old),
            "u": test.map(|t| t.0), "z": test.map(|t| t.1), "p_value": test.map(|t| t.2),
            "confidence": b.confidence, "min_samples": b.min_samples, "step_secs": b.step_secs,
            "window_secs": window}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_requests_are_counted_from_the_bound_under_the_threshold() {
        let w = Window {
            total: 100,
            errors: 0,
            buckets: vec![(0.05, 50), (0.1, 70), (0.25, 90), (f64::INFINITY, 100)],
        };
        assert_eq!(slower_than(&w, 100.0), 30);
        assert_eq!(
            slower_than(&w, 200.0),
            30,
            "a threshold inside a bucket counts it slow"
        );
        assert_eq!(slower_than(&w, 10.0), 100);
        assert_eq!(slower_than(&w, 1000.0), 10);
    }

    #[test]
    fn the_per_cell_gates_are_the_ones_turned_on() {
        let mut g = Gates::default();
        assert_eq!(cell_gates(&g), vec!["error_ratio"]);
        g.max_error_ratio = None;
        g.burn_rate = Some(cellplane_api::releases::BurnRateGate {
            slo_target: 0.99,
            latency_threshold_ms: None,
            rules: Vec::new(),
        });
        assert_eq!(cell_gates(&g), vec!["burn_rate"]);
    }
}

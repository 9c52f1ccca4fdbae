//! `cellplane release create|status|list|pause|resume|approve|abort|retry|skip`: releases
//! from flags or a JSON/YAML body, and a live view of waves, cells and gate decisions.

use super::{print_json, print_table, CliError, CliResult};
use cellplane_api::releases::{Release, ReleaseState, ReleaseWithJob};
use cellplane_api::{Client, Page};
use clap::Subcommand;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum ReleaseCmd {
    /// Start a release: flags, or the body of `POST /v1/releases` from a file (flags win).
    #[command(after_help = "Example:\n  \
        cellplane release create rel-42 --app-version v42 --var log_level=debug --watch\n  \
        cellplane release create rel-42 -f release.json --wait")]
    Create {
        /// Release id (unique).
        id: String,
        /// The app version the cells get.
        #[arg(long)]
        app_version: Option<String>,
        /// A template variable set on every cell of the release (KEY=VALUE; the value is
        /// read as JSON when it parses, else as a string); repeatable.
        #[arg(long = "var", value_name = "KEY=VALUE")]
        vars: Vec<String>,
        /// The request body (JSON or YAML): waves, gates, rollback, freeze windows.
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
        /// Wait until the release ends, printing a line per change; exit 0 only when it
        /// succeeded.
        #[arg(long, conflicts_with = "watch")]
        wait: bool,
        /// Follow it with the live view until it ends; exit 0 only when it succeeded.
        #[arg(long)]
        watch: bool,
    },
    /// Waves, cells, and the latest gate decisions of a release.
    Status {
        /// Release id.
        id: String,
        /// Redraw until the release ends (exit 0 only when it succeeded).
        #[arg(long)]
        watch: bool,
        /// Gate decisions shown (the latest).
        #[arg(long, default_value_t = 8)]
        decisions: usize,
    },
    /// Releases, newest first.
    List,
    /// Stop after the current evaluation; nothing is rolled back.
    Pause {
        /// Release id.
        id: String,
    },
    /// Go on (after a pause, an inconclusive gate, a refused wave).
    Resume {
        /// Release id.
        id: String,
    },
    /// Let the wave awaiting manual approval start.
    Approve {
        /// Release id.
        id: String,
    },
    /// Roll back what the release changed, in reverse order, and end it `aborted`.
    Abort {
        /// Release id.
        id: String,
    },
    /// Apply a cell that failed again.
    Retry {
        /// Release id.
        id: String,
        /// A cell of the current wave.
        #[arg(long)]
        cell: String,
    },
    /// Leave out a cell that is unavailable (listed as skipped, never as passed).
    Skip {
        /// Release id.
        id: String,
        /// A cell of the current wave.
        #[arg(long)]
        cell: String,
    },
}

pub async fn release(c: Client, cmd: ReleaseCmd, json: bool) -> CliResult {
    match cmd {
        ReleaseCmd::Create {
            id,
            app_version,
            vars,
            file,
            wait,
            watch,
        } => {
            let body = body_of(&id, app_version, &vars, file.as_deref())?;
            let out: ReleaseWithJob = c.post("/v1/releases", &body).await?;
            if wait || watch {
                if !json {
                    eprintln!(
                        "release {} started (job {})",
                        out.release.release_id, out.job.job_id
                    );
                }
                return follow(&c, &id, json, watch, 8).await;
            }
            if json {
                print_json(&out);
            } else {
                show(&out.release, 8);
            }
            Ok(())
        }
        ReleaseCmd::Status {
            id,
            watch,
            decisions,
        } => {
            if watch {
                return follow(&c, &id, json, true, decisions).await;
            }
            let r: Release = c.get(&format!("/v1/releases/{id}")).await?;
            if json {
                print_json(&r);
            } else {
                show(&r, decisions);
            }
            Ok(())
        }
        ReleaseCmd::List => {
            let page: Page<Release> = c.get("/v1/releases?limit=100").await?;
            if json {
                print_json(&page.items);
                return Ok(());
            }
            print_table(
                &["RELEASE", "VERSION", "STATE", "WAVE", "UPDATED"],
                page.items
                    .iter()
                    .map(|r| {
                        vec![
                            r.release_id.clone(),
                            r.app_version.clone(),
                            r.state.as_str().to_string(),
                            current_wave(r),
                            r.updated_at.clone(),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        ReleaseCmd::Pause { id } => action(&c, &id, "pause", None, json).await,
        ReleaseCmd::Resume { id } => action(&c, &id, "resume", None, json).await,
        ReleaseCmd::Approve { id } => action(&c, &id, "approve", None, json).await,
        ReleaseCmd::Abort { id } => action(&c, &id, "abort", None, json).await,
        ReleaseCmd::Retry { id, cell } => action(&c, &id, "retry", Some(cell), json).await,
        ReleaseCmd::Skip { id, cell } => action(&c, &id, "skip", Some(cell), json).await,
    }
}

/// The body of `POST /v1/releases`: the file's, then the flags over it.
fn body_of(
    id: &str,
    app_version: Option<String>,
    vars: &[String],
    file: Option<&std::path::Path>,
) -> Result<serde_json::Value, CliError> {
    let mut body = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| CliError::Usage(format!("reading {}: {e}", p.display())))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .or_else(|_| serde_yaml_ng::from_str(&text))
                .map_err(|e| {
                    CliError::Usage(format!("{} is neither JSON nor YAML: {e}", p.display()))
                })?;
            if !v.is_object() {
                return Err(CliError::Usage(format!(
                    "{} must hold one object (the body of POST /v1/releases)",
                    p.display()
                )));
            }
            v
        }
        None => serde_json::json!({}),
    };
    body["release_id"] = id.into();
    if let Some(v) = app_version {
        body["app_version"] = v.into();
    }
    if body.get("app_version").is_none() {
        return Err(CliError::Usage(
            "--app-version is required (or app_version in the file)".into(),
        ));
    }
    if !vars.is_empty() && !body["vars"].is_object() {
        body["vars"] = serde_json::json!({});
    }
    for kv in vars {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(CliError::Usage(format!("--var {kv:?}: expected KEY=VALUE")));
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::from(v));
        body["vars"][k] = value;
    }
    Ok(body)
}

async fn action(c: &Client, id: &str, action: &str, cell: Option<String>, json: bool) -> CliResult {
    let body = match cell {
        Some(cell) => serde_json::json!({ "cell_id": cell }),
        None => serde_json::json!({}),
    };
    let r: Release = c
        .post(&format!("/v1/releases/{id}/{action}"), &body)
        .await?;
    if json {
        print_json(&r);
    } else {
        show(&r, 4);
    }
    Ok(())
}

fn current_wave(r: &Release) -> String {
    r.waves
        .iter()
        .find(|w| !matches!(w.state.as_str(), "passed" | "pending"))
        .or_else(|| r.waves.iter().find(|w| w.state == "pending"))
        .map(|w| format!("{} ({})", w.name, w.state))
        .unwrap_or_else(|| "-".into())
}

/// The release as text: its state and reason, each wave with its cells, and the latest
/// `decisions` gate decisions with the numbers behind them.
fn render(r: &Release, decisions: usize) -> String {
    let mut out = format!(
        "release {} → {}: {}{}\n",
        r.release_id,
        r.app_version,
        r.state.as_str(),
        r.reason
            .as_deref()
            .map(|x| format!(" — {x}"))
            .unwrap_or_default()
    );
    for w in &r.waves {
        out.push_str(&format!(
            "  wave {:<12} {:<18} bake {} s, {} at once{}\n",
            w.name,
            w.state,
            w.bake_seconds,
            w.max_parallel,
            if w.approval == cellplane_api::releases::Approval::Manual {
                ", manual approval"
            } else {
                ""
            }
        ));
        for c in &w.cells {
            out.push_str(&format!(
                "    {:<24} {:<10} {} → {}{}\n",
                c.cell_id,
                c.state,
                c.from_version.as_deref().unwrap_or("-"),
                c.to_version,
                c.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            ));
        }
    }
    let skip = r.decisions.len().saturating_sub(decisions);
    if decisions > 0 && !r.decisions.is_empty() {
        out.push_str("  decisions:\n");
    }
    for d in r.decisions.iter().skip(skip) {
        out.push_str(&format!(
            "    {} {:<10} {:<12} {:<14} {}{}\n",
            d.at,
            d.wave,
            d.gate,
            d.result,
            d.cell_id.as_deref().unwrap_or("(wave)"),
            summary(&d.measurements)
        ));
    }
    out
}

/// The numbers of a decision that say the most, in a few words.
fn summary(m: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    let num = |k: &str| m.get(k).and_then(|v| v.as_f64());
    if let Some(n) = m.get("requests").and_then(|v| v.as_u64()) {
        parts.push(format!("{n} req"));
    }
    if let Some(x) = num("error_ratio") {
        parts.push(format!("errors {:.2} %", x * 100.0));
    }
    if let Some(x) = num("value_ms") {
        parts.push(format!(
            "p{} {x:.0} ms",
            (num("percentile").unwrap_or(0.0) * 100.0)
        ));
    }
    if let Some(rules) = m.get("rules").and_then(|v| v.as_array()) {
        for r in rules {
            if let Some(s) = r.get("short_burn_rate").and_then(|v| v.as_f64()) {
                parts.push(format!("burn {s:.1}×"));
            }
        }
    }
    if let Some(p) = num("p_value") {
        parts.push(format!("p={p:.4}"));
    }
    if let Some(e) = m.get("error").and_then(|v| v.as_str()) {
        parts.push(e.to_string());
    }
    if let Some(e) = m.get("reason").and_then(|v| v.as_str()) {
        parts.push(e.to_string());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("  {}", parts.join(", "))
    }
}

fn show(r: &Release, decisions: usize) {
    print!("{}", render(r, decisions));
}

/// Follows a release until it ends. With `live`, the view is redrawn in place on a
/// terminal (or printed again when it changed, elsewhere); without, one line per change.
/// Exits 0 only when the release succeeded.
async fn follow(c: &Client, id: &str, json: bool, live: bool, decisions: usize) -> CliResult {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    let r = loop {
        let r: Release = c.get(&format!("/v1/releases/{id}")).await?;
        let ended = !r.state.is_active();
        if !json {
            if live {
                let view = render(&r, decisions);
                if view != last {
                    let mut out = std::io::stdout().lock();
                    if tty {
                        // Clear the screen and draw from the top.
                        let _ = write!(out, "\x1b[2J\x1b[H");
                    }
                    let _ = write!(out, "{view}");
                    if !tty {
                        let _ = writeln!(out);
                    }
                    let _ = out.flush();
                    last = view;
                }
            } else {
                let line = format!(
                    "{} · {}{}",
                    r.state.as_str(),
                    current_wave(&r),
                    r.reason
                        .as_deref()
                        .map(|x| format!(" · {x}"))
                        .unwrap_or_default()
                );
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            }
        }
        if ended {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if json {
        print_json(&r);
    } else if !live {
        show(&r, decisions);
    }
    if r.state != ReleaseState::Succeeded {
        return Err(CliError::Usage(format!(
            "release {} ended {}: {}",
            r.release_id,
            r.state.as_str(),
            r.reason.as_deref().unwrap_or("-")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_over_the_file_body() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.yaml");
        std::fs::write(
            &p,
            "app_version: v1\nvars: {a: 1}\nwaves: [{name: canary, selector: {labels: {canary: \"true\"}}}]\n",
        )
        .unwrap();
        let b = body_of(
            "rel-1",
            Some("v2".into()),
            &["b=two".into(), "c=3".into()],
            Some(&p),
        )
        .unwrap();
        assert_eq!(b["release_id"], "rel-1");
        assert_eq!(b["app_version"], "v2");
        assert_eq!(b["vars"], serde_json::json!({"a": 1, "b": "two", "c": 3}));
        assert_eq!(b["waves"][0]["name"], "canary");
        assert!(matches!(
            body_of("rel-1", None, &[], None),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            body_of("rel-1", Some("v".into()), &["novalue".into()], None),
            Err(CliError::Usage(_))
        ));
    }
}

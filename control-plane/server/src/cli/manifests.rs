//! `cellplane apply`, `cellplane diff` and `cellplane get`: manifests from files and
//! directories, plans printed as field-level diffs, objects printed as documents that
//! re-apply as no-ops.

use super::{client, print_table, CliError, CliResult};
use cellplane_api::manifests::{Kind, PlanAction};
use cellplane_api::{ApplyResult, Client, ClientError, Document, Page, Tenant};
use clap::Args;
use std::path::PathBuf;

/// Connection flags of the manifest commands.
#[derive(Args, Debug)]
pub struct Conn {
    /// Control plane URL.
    #[arg(long, env = "CELLPLANE_URL", default_value = "http://127.0.0.1:7480")]
    pub url: String,
    /// API token (default: ./.cellplane/admin-token when present).
    #[arg(long, env = "CELLPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A manifest file (YAML, `---`-separated, or JSON) or a directory of them
    /// (`*.yaml`, `*.yml`, `*.json`, in name order); repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply what can be applied and report the rest (default: all or nothing).
    #[arg(long)]
    pub partial: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// A manifest file or a directory of them; repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// tenant(s), cell(s), organization(s) or regionpolicy/region(s).
    pub kind: String,
    /// One object (default: all of the kind).
    pub name: Option<String>,
    /// Output: `table` (default), `yaml` or `json` (documents that re-apply as no-ops).
    #[arg(short = 'o', long = "output", default_value = "table", value_parser = ["table", "yaml", "json"])]
    pub output: String,
    /// More columns: the reason when not ready, and drift.
    #[arg(long)]
    pub wide: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// The documents of the given files, as one YAML stream, and where each document came from.
fn read_files(paths: &[PathBuf]) -> Result<(String, Vec<String>), CliError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| {
                    e.is_file()
                        && matches!(
                            e.extension().and_then(|x| x.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(p.clone());
        }
    }
    let mut stream = String::new();
    let mut origin = Vec::new();
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| CliError::Usage(format!("{}: {e}", f.display())))?;
        let docs: Vec<String> = if f.extension().and_then(|x| x.to_str()) == Some("json") {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(serde_json::Value::Array(items)) => {
                    items.iter().map(|i| i.to_string()).collect()
                }
                Ok(v) => vec![v.to_string()],
                Err(e) => {
                    problems.push(format!("{}: invalid JSON: {e}", f.display()));
                    continue;
                }
            }
        } else {
            // Checked here so a syntax error names the file; the server reads it again.
            let (values, errors) = crate::manifests::read_yaml(&text);
            for e in &errors {
                problems.push(format!("{}: {}: {}", f.display(), e.field, e.message));
            }
            let _ = values;
            vec![text]
        };
        for d in docs {
            let (values, _) = crate::manifests::read_yaml(&d);
            for (k, _) in values.iter().enumerate() {
                origin.push(format!("{} (document {})", f.display(), k + 1));
            }
            stream.push_str("---\n");
            stream.push_str(&d);
            if !d.ends_with('\n') {
                stream.push('\n');
            }
        }
    }
    if !problems.is_empty() {
        return Err(CliError::Usage(problems.join("\n")));
    }
    if origin.is_empty() {
        return Err(CliError::Usage("no documents in the given files".into()));
    }
    Ok((stream, origin))
}

/// Rewrites `documents[N]…` in an error to the file and document it came from.
fn locate(field: &str, origin: &[String]) -> String {
    if let Some(rest) = field.strip_prefix("documents[") {
        if let Some((n, tail)) = rest.split_once(']') {
            if let Some(o) = n.parse::<usize>().ok().and_then(|n| origin.get(n)) {
                return format!("{o}{tail}");
            }
        }
    }
    field.to_string()
}

async fn send_apply(
    c: &Client,
    stream: String,
    dry_run: bool,
    partial: bool,
) -> Result<ApplyResult, ClientError> {
    let path = format!("/v1/apply?dry_run={dry_run}&partial={partial}");
    c.post_raw(&path, "application/yaml", stream.into_bytes())
        .await
}

fn short(v: &Option<serde_json::Value>) -> String {
    match v {
        None => "(none)".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn print_plan(r: &ApplyResult, origin: &[String], only_changes: bool) {
    let (mut create, mut update, mut unchanged, mut jobs, mut refused) = (0, 0, 0, 0, 0);
    for o in &r.objects {
        match o.action {
            PlanAction::Create => create += 1,
            PlanAction::Update => update += 1,
            PlanAction::Unchanged => unchanged += 1,
        }
        jobs += o.jobs.len();
        if o.refusal.is_some() {
            refused += 1;
        }
        if only_changes && o.action == PlanAction::Unchanged && o.refusal.is_none() {
            continue;
        }
        let action = match o.action {
            PlanAction::Create => "create",
            PlanAction::Update => "update",
            PlanAction::Unchanged => "unchanged",
        };
        println!("{} {}: {action}", o.kind.as_str(), o.name);
        for d in &o.diff {
            println!("  ~ {}: {} → {}", d.path, short(&d.from), short(&d.to));
        }
        for j in &o.jobs {
            println!("  job: {j}");
        }
        if let Some(rf) = &o.refusal {
            println!(
                "  {}: {} ({})",
                if rf.blocking { "REFUSED" } else { "will wait" },
                rf.message,
                rf.reason
            );
        }
    }
    for e in &r.errors {
        println!("INVALID {}: {}", locate(&e.field, origin), e.message);
    }
    println!(
        "{} object(s): {create} to create, {update} to update, {unchanged} unchanged; {jobs} job(s); {refused} refused or waiting{}",
        r.objects.len(),
        if r.dry_run { " (dry run: nothing changed)" } else { "" }
    );
}

fn api_error(e: ClientError, origin: &[String]) -> CliError {
    match e {
        ClientError::Api(mut p) => {
            for f in p.errors.iter_mut() {
                f.field = locate(&f.field, origin);
            }
            CliError::Client(ClientError::Api(p))
        }
        other => CliError::Client(other),
    }
}

pub async fn apply(a: ApplyArgs) -> CliResult {
    let (stream, origin) = read_files(&a.files)?;
    let json = a.conn.json;
    client((a.conn.url, a.conn.token), |c| async move {
        let r = send_apply(&c, stream, a.dry_run, a.partial)
            .await
            .map_err(|e| api_error(e, &origin))?;
        if json {
            super::print_json(&r);
        } else {
            print_plan(&r, &origin, false);
        }
        Ok(())
    })
    .await
}

pub async fn diff(a: DiffArgs) -> CliResult {
    let (stream, origin) = read_files(&a.files)?;
    let json = a.conn.json;
    client((a.conn.url, a.conn.token), |c| async move {
        let r = send_apply(&c, stream, true, false)
            .await
            .map_err(|e| api_error(e, &origin))?;
        if json {
            super::print_json(&r);
        } else {
            print_plan(&r, &origin, true);
        }
        Ok(())
    })
    .await
}

async fn names(c: &Client, kind: Kind) -> Result<Vec<String>, ClientError> {
    Ok(match kind {
        Kind::Organization => c
            .all::<cellplane_api::Organization>("/v1/organizations")
            .await?
            .into_iter()
            .map(|o| o.organization_id)
            .collect(),
        Kind::Cell => c
            .all::<cellplane_api::Cell>("/v1/cells")
            .await?
            .into_iter()
            .filter(|c| c.state != cellplane_api::CellState::Destroyed)
            .map(|c| c.cell_id)
            .collect(),
        Kind::Tenant => c
            .all::<Tenant>("/v1/tenants")
            .await?
            .into_iter()
            .filter(|t| t.state != cellplane_api::TenantState::Deleted)
            .map(|t| t.tenant_id)
            .collect(),
        Kind::RegionPolicy => c
            .get::<Page<cellplane_api::Region>>("/v1/regions")
            .await?
            .items
            .into_iter()
            .map(|r| r.region)
            .collect(),
    })
}

fn tenant_rows(tenants: &[Tenant], wide: bool) {
    let mut headers = vec![
        "TENANT", "STATE", "DESIRED", "PHASE", "READY", "GEN", "OBSERVED",
    ];
    if wide {
        headers.extend(["ENVIRONMENTS", "REASON", "DRIFT"]);
    }
    let rows = tenants
        .iter()
        .map(|t| {
            let st = t.status.as_ref();
            let ready = st.and_then(|s| s.condition("Ready"));
            let mut row = vec![
                t.tenant_id.clone(),
                t.state.as_str().into(),
                t.desired_state.as_str().into(),
                st.map(|s| s.phase.clone()).unwrap_or_else(|| "-".into()),
                ready
                    .map(|c| c.status.clone())
                    .unwrap_or_else(|| "-".into()),
                t.generation.to_string(),
                st.map(|s| s.observed_generation.to_string())
                    .unwrap_or_else(|| "-".into()),
            ];
            if wide {
                row.push(
                    t.environments
                        .iter()
                        .map(|e| format!("{}={}", e.name, e.cell_id.as_deref().unwrap_or("-")))
                        .collect::<Vec<_>>()
                        .join(","),
                );
                row.push(
                    ready
                        .filter(|c| c.status != "True")
                        .map(|c| format!("{}: {}", c.reason, c.message))
                        .unwrap_or_default(),
                );
                row.push(
                    st.map(|s| {
                        s.drift
                            .iter()
                            .map(|d| format!("{}: {}", d.field, d.actual))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default(),
                );
            }
            row
        })
        .collect();
    print_table(&headers, rows);
}

pub async fn get(a: GetArgs) -> CliResult {
    let kind = Kind::parse_lower(&a.kind).ok_or_else(|| {
        CliError::Usage(format!(
            "unknown kind {:?}: tenant, cell, organization or regionpolicy",
            a.kind
        ))
    })?;
    if let Some(n) = &a.name {
        super::id_arg(kind.as_str(), n)?;
    }
    let (output, wide, name) = (a.output, a.wide, a.name);
    client((a.conn.url, a.conn.token), |c| async move {
        if output == "table" && kind == Kind::Tenant {
            let tenants: Vec<Tenant> = match &name {
                Some(n) => vec![c.get(&format!("/v1/tenants/{n}")).await?],
                None => c.all("/v1/tenants").await?,
            };
            tenant_rows(&tenants, wide);
            if let (Some(t), true) = (tenants.first(), name.is_some()) {
                if let Some(st) = &t.status {
                    println!();
                    print_table(
                        &["CONDITION", "STATUS", "REASON", "MESSAGE", "SINCE"],
                        st.conditions
                            .iter()
                            .map(|c| {
                                vec![
                                    c.type_.clone(),
                                    c.status.clone(),
                                    c.reason.clone(),
                                    c.message.clone(),
                                    c.last_transition_time.clone(),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            return Ok(());
        }
        let names = match &name {
            Some(n) => vec![n.clone()],
            None => names(&c, kind).await?,
        };
        let mut docs: Vec<Document> = Vec::with_capacity(names.len());
        let path_kind = kind.as_str().to_ascii_lowercase();
        for n in &names {
            docs.push(c.get(&format!("/v1/manifests/{path_kind}/{n}")).await?);
        }
        match output.as_str() {
            "yaml" => {
                for d in &docs {
                    let text = serde_yaml_ng::to_string(d).map_err(|e| {
                        CliError::Usage(format!("cannot print {} as YAML: {e}", d.metadata.name))
                    })?;
                    print!("---\n{text}");
                }
            }
            "json" => super::print_json(&docs),
            _ => print_table(
                &["KIND", "NAME", "VERSION", "GENERATION", "PHASE"],
                docs.iter()
                    .map(|d| {
                        vec![
                            d.kind.as_str().into(),
                            d.metadata.name.to_string(),
                            d.metadata
                                .version
                                .map(|v| v.to_string())
                                .unwrap_or_default(),
                            d.metadata
                                .generation
                                .map(|v| v.to_string())
                                .unwrap_or_default(),
                            d.status
                                .as_ref()
                                .and_then(|s| s.get("phase"))
                                .and_then(|p| p.as_str())
                                .unwrap_or("-")
                                .into(),
                        ]
                    })
                    .collect(),
            ),
        }
        Ok(())
    })
    .await
}

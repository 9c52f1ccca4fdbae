//! The terraform runner (after Atlantis, OTF and terraform-exec): one working directory per
//! cell, an environment that starts empty, a CLI configuration cellplane writes, serialized
//! `init`, `plan -out` then `apply` of that plan, and the `-json` stream turned into
//! progress events and log lines with sensitive values redacted.
//!
//! Terraform runs in its own process group with its output going to a file
//! (`runs/<job>-<attempt>-<phase>.ndjson`) that the runner tails, so it survives the control
//! plane: a control plane that stops or dies leaves terraform to finish and write its state,
//! and the next lease holder waits for it (its pid is in `terraform.pid`) before it re-plans.
//! Cancel sends one SIGINT, keeps reading, and kills the process group after a grace
//! period. A global semaphore bounds how many terraform processes run at once.

use super::IacError;
use crate::secret::Secret;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

/// Where terraform keeps a cell's state.
#[derive(Debug, Clone)]
pub enum StateBackend {
    /// `terraform.tfstate` in the cell's working directory (SQLite store).
    Local,
    /// terraform's `pg` backend, one schema per cell (PostgreSQL store): any replica can
    /// resume any cell's job.
    Pg { conn_str: Secret },
}

/// Runner settings, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// `terraform` or `tofu`, or a path.
    pub binary: String,
    pub data_dir: PathBuf,
    pub provider_mirror: Option<PathBuf>,
    pub concurrency: usize,
    pub lock_timeout_secs: u64,
    pub cancel_grace: Duration,
    /// PATH given to terraform (and to the provisioners it runs).
    pub path: String,
    /// Names of variables copied from cellplane's environment (credentials).
    pub pass_env: Vec<String>,
    /// Extra variables set for terraform.
    pub env: BTreeMap<String, String>,
    pub backend: StateBackend,
}

/// What the runner reports while terraform runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// A line for the job log (already redacted).
    Log(String),
    /// The plan's number of resource changes.
    Planned(u64),
    /// Resource changes applied so far.
    Applied(u64),
    /// Terraform is alive and working (apply_progress).
    Heartbeat,
    /// The job entered a phase (render, init, plan, apply, outputs).
    Phase(&'static str),
}

/// One terraform session of a job.
#[derive(Clone)]
pub struct RunCtx {
    pub cell_id: String,
    pub job_id: String,
    pub attempt: i64,
    /// Interrupt terraform (SIGINT, then kill after the grace period).
    pub cancel: CancellationToken,
    /// Stop waiting and leave terraform running (the control plane is stopping).
    pub detach: CancellationToken,
    pub events: UnboundedSender<ExecEvent>,
    /// Values to redact from every log line.
    pub secrets: Vec<String>,
}

impl RunCtx {
    fn log(&self, line: impl Into<String>) {
        let _ = self
            .events
            .send(ExecEvent::Log(redact(&line.into(), &self.secrets)));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    Apply,
    Destroy,
    /// Drift check: a plan without a plan file. Resources it would change are drifted
    /// (changed outside terraform in a way the configuration disagrees with). A
    /// `-refresh-only` plan also reports attributes an API merely normalizes, so it is not
    /// used to decide.
    Drift,
}

/// A resource changed outside terraform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub address: String,
    pub action: String,
}

#[derive(Debug, Clone, Default)]
pub struct PlanOutcome {
    pub changes: bool,
    pub add: u64,
    pub change: u64,
    pub remove: u64,
    /// Resources changed outside terraform, as refresh saw them.
    pub drift: Vec<Drift>,
    /// Resources the plan would change.
    pub planned: Vec<Drift>,
}

/// An output of the stack.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputValue {
    pub value: Value,
    pub sensitive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `-json` machine-readable UI: one message per line.
    Json,
    /// Human text: each line goes to the log.
    Text,
    /// Keep stdout whole (e.g. `output -json`); nothing is logged from it.
    Capture,
}

#[derive(Debug, Default)]
struct ExecResult {
    code: i32,
    errors: Vec<String>,
    planned: Option<(u64, u64, u64)>,
    applied: u64,
    drift: Vec<Drift>,
    changes: Vec<Drift>,
    /// The `outputs` message of an apply (values of sensitive outputs are absent).
    outputs: Option<BTreeMap<String, Value>>,
    captured: String,
}

#[derive(Clone)]
pub struct Terraform {
    s: Arc<RunnerSettings>,
    cli_config: PathBuf,
    sem: Arc<tokio::sync::Semaphore>,
    init_lock: Arc<tokio::sync::Mutex<()>>,
    running: Arc<AtomicUsize>,
}

impl Terraform {
    /// Writes the CLI configuration into the data directory.
    pub fn new(settings: RunnerSettings) -> Result<Self, IacError> {
        let home = settings.data_dir.join("terraform");
        std::fs::create_dir_all(&home).map_err(|e| IacError::io(&home, e))?;
        let cli_config = home.join("terraform.rc");
        let mut rc = String::from(
            "# Written by cellplane at startup; edits are overwritten.\ndisable_checkpoint = true\n",
        );
        if let Some(m) = &settings.provider_mirror {
            rc.push_str(&format!(
                "provider_installation {{\n  filesystem_mirror {{\n    path = \"{}\"\n  }}\n}}\n",
                super::hcl_escape(&m.display().to_string())
            ));
        }
        std::fs::write(&cli_config, rc).map_err(|e| IacError::io(&cli_config, e))?;
        Ok(Self {
            sem: Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1))),
            s: Arc::new(settings),
            cli_config,
            init_lock: Arc::new(tokio::sync::Mutex::new(())),
            running: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// `<data_dir>/cells/<cell_id>`: the stack, its state (local backend) and run logs.
    pub fn cell_dir(&self, cell_id: &str) -> PathBuf {
        self.s.data_dir.join("cells").join(cell_id)
    }

    /// Terraform processes this control plane runs now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// The counter behind [`Terraform::running`], for `/metrics`.
    pub fn running_counter(&self) -> Arc<AtomicUsize> {
        self.running.clone()
    }

    pub fn backend(&self) -> &StateBackend {
        &self.s.backend
    }

    /// The PostgreSQL schema holding a cell's state with the `pg` backend.
    pub fn state_schema(cell_id: &str) -> String {
        format!("cellplane_tf_{}", cell_id.replace('-', "_"))
    }

    fn env(&self, cell_id: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("PATH".to_string(), self.s.path.clone()),
            (
                "HOME".to_string(),
                self.s.data_dir.join("terraform").display().to_string(),
            ),
            ("TF_IN_AUTOMATION".to_string(), "1".to_string()),
            ("TF_INPUT".to_string(), "0".to_string()),
            ("CHECKPOINT_DISABLE".to_string(), "1".to_string()),
            (
                "TF_CLI_CONFIG_FILE".to_string(),
                self.cli_config.display().to_string(),
            ),
        ];
        for name in &self.s.pass_env {
            if let Ok(v) = std::env::var(name) {
                env.push((name.clone(), v));
            }
        }
        for (k, v) in &self.s.env {
            env.push((k.to_ascii_uppercase(), v.clone()));
        }
        if let StateBackend::Pg { conn_str } = &self.s.backend {
            env.push(("PG_CONN_STR".into(), conn_str.expose().to_string()));
            env.push(("PG_SCHEMA_NAME".into(), Self::state_schema(cell_id)));
        }
        env
    }

    fn binary(&self) -> PathBuf {
        let b = &self.s.binary;
        if b.contains('/') {
            return PathBuf::from(b);
        }
        let parent = std::env::var("PATH").unwrap_or_default();
        for dir in self.s.path.split(':').chain(parent.split(':')) {
            let p = Path::new(dir).join(b);
            if p.is_file() {
                return p;
            }
        }
        PathBuf::from(b)
    }

    /// Waits for a terraform process an earlier attempt left running in this cell's
    /// directory (the control plane stopped or died while it ran), so two never work on
    /// one state. Cancelling interrupts it.
    pub async fn wait_leftover(&self, ctx: &RunCtx) -> Result<(), IacError> {
        let dir = self.cell_dir(&ctx.cell_id);
        let pid_file = dir.join("terraform.pid");
        let Some((pid, start)) = read_pid_file(&pid_file) else {
            return Ok(());
        };
        if !alive(pid, start) {
            let _ = std::fs::remove_file(&pid_file);
            return Ok(());
        }
        ctx.log(format!(
            "waiting for terraform (pid {pid}) left running by an earlier attempt to finish"
        ));
        tracing::info!(pid, "waiting for a leftover terraform process");
        let mut interrupted: Option<Instant> = None;
        while alive(pid, start) {
            if ctx.detach.is_cancelled() {
                return Err(IacError::Detached { phase: "wait" });
            }
            if ctx.cancel.is_cancelled() && interrupted.is_none() {
                interrupt(pid);
                interrupted = Some(Instant::now());
            }
            if interrupted.is_some_and(|t| t.elapsed() > self.s.cancel_grace) {
                kill_group(pid);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        kill_group(pid);
        let _ = std::fs::remove_file(&pid_file);
        ctx.log("the earlier terraform process has exited");
        if interrupted.is_some() {
            return Err(IacError::Cancelled { phase: "wait" });
        }
        Ok(())
    }

    /// `init`, serialized across cells (the plugin installer is not concurrency safe).
    /// Skipped when this working directory was initialized for the same stack
    /// (`fingerprint` of its configuration) by an earlier run.
    pub async fn init(&self, ctx: &RunCtx, fingerprint: &str) -> Result<(), IacError> {
        let marker = self
            .cell_dir(&ctx.cell_id)
            .join(".terraform")
            .join("cellplane-init");
        let fingerprint = format!(
            "{fingerprint} {} {}",
            self.s.binary,
            match self.s.backend {
                StateBackend::Local => "local",
                StateBackend::Pg { .. } => "pg",
            }
        );
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(fingerprint.as_str()) {
            ctx.log("working directory already initialized for this configuration");
            return Ok(());
        }
        // The init lock first: a cell queued for init holds no process slot that another
        // cell's plan or apply could use meanwhile.
        let _init = self.init_lock.lock().await;
        let permit = self.permit().await;
        let r = self
            .exec(
                ctx,
                permit,
                "init",
                &["init", "-input=false", "-no-color"],
                Mode::Text,
            )
            .await?;
        check(&r, "init", 0)?;
        if let Some(parent) = marker.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&marker, fingerprint);
        Ok(())
    }

    /// `plan -out=tfplan` (or `-refresh-only` without a plan file, for drift).
    pub async fn plan(&self, ctx: &RunCtx, mode: PlanMode) -> Result<PlanOutcome, IacError> {
        let permit = self.permit().await;
        let lock = format!("-lock-timeout={}s", self.s.lock_timeout_secs);
        let mut args = vec![
            "plan",
            "-input=false",
            "-json",
            "-detailed-exitcode",
            lock.as_str(),
        ];
        match mode {
            PlanMode::Apply => args.push("-out=tfplan"),
            PlanMode::Destroy => args.extend(["-destroy", "-out=tfplan"]),
            PlanMode::Drift => {}
        }
        let phase = match mode {
            PlanMode::Drift => "drift-check",
            _ => "plan",
        };
        let r = self.exec(ctx, permit, phase, &args, Mode::Json).await?;
        if r.code != 0 && r.code != 2 {
            return Err(failure(&r, phase));
        }
        let (add, change, remove) = r.planned.unwrap_or_default();
        Ok(PlanOutcome {
            changes: r.code == 2,
            add,
            change,
            remove,
            drift: r.drift,
            planned: r.changes,
        })
    }

    /// `apply tfplan`: applies exactly the plan that was just made. Returns the outputs
    /// when the apply reported all of them with their values (no sensitive output), which
    /// saves an `output -json` run.
    pub async fn apply(
        &self,
        ctx: &RunCtx,
    ) -> Result<Option<BTreeMap<String, OutputValue>>, IacError> {
        let permit = self.permit().await;
        let lock = format!("-lock-timeout={}s", self.s.lock_timeout_secs);
        let r = self
            .exec(
                ctx,
                permit,
                "apply",
                &["apply", "-input=false", "-json", lock.as_str(), "tfplan"],
                Mode::Json,
            )
            .await?;
        check(&r, "apply", 0)?;
        let Some(outputs) = r.outputs else {
            return Ok(None);
        };
        let mut out = BTreeMap::new();
        for (k, v) in outputs {
            match v.get("value") {
                Some(value) if v["sensitive"] != true => {
                    out.insert(
                        k,
                        OutputValue {
                            value: value.clone(),
                            sensitive: false,
                        },
                    );
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// `output -json`.
    pub async fn outputs(&self, ctx: &RunCtx) -> Result<BTreeMap<String, OutputValue>, IacError> {
        let permit = self.permit().await;
        let r = self
            .exec(ctx, permit, "output", &["output", "-json"], Mode::Capture)
            .await?;
        check(&r, "output", 0)?;
        let doc: BTreeMap<String, Value> =
            serde_json::from_str(&r.captured).map_err(|e| IacError::Output {
                phase: "output",
                message: e.to_string(),
            })?;
        Ok(doc
            .into_iter()
            .map(|(k, v)| {
                let out = OutputValue {
                    sensitive: v["sensitive"].as_bool().unwrap_or(false),
                    value: v.get("value").cloned().unwrap_or(Value::Null),
                };
                (k, out)
            })
            .collect())
    }

    async fn permit(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_owned()
            .await
            .expect("the terraform semaphore is never closed")
    }

    /// Runs one terraform command in the cell's directory and follows its output.
    /// `permit` is the process slot it runs in: it is released when terraform has exited,
    /// also when the runner stops waiting for it (detach), so the limit holds.
    async fn exec(
        &self,
        ctx: &RunCtx,
        permit: tokio::sync::OwnedSemaphorePermit,
        phase: &'static str,
        args: &[&str],
        mode: Mode,
    ) -> Result<ExecResult, IacError> {
        if ctx.detach.is_cancelled() {
            return Err(IacError::Detached { phase });
        }
        if ctx.cancel.is_cancelled() {
            return Err(IacError::Cancelled { phase });
        }
        let dir = self.cell_dir(&ctx.cell_id);
        let runs = dir.join("runs");
        std::fs::create_dir_all(&runs).map_err(|e| IacError::io(&runs, e))?;
        let base = format!("{}-{}-{phase}", ctx.job_id, ctx.attempt);
        let out_path = runs.join(format!("{base}.ndjson"));
        let err_path = runs.join(format!("{base}.stderr"));
        let out_file = create_private(&out_path)?;
        let err_file = create_private(&err_path)?;
        let binary = self.binary();
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.args(args)
            .current_dir(&dir)
            .env_clear()
            .envs(self.env(&ctx.cell_id))
            .stdin(std::process::Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| IacError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or_default() as i32;
        let pid_file = dir.join("terraform.pid");
        if let Some(start) = start_time(pid) {
            let _ = std::fs::write(&pid_file, format!("{pid} {start}\n"));
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let running = RunningGuard(self.running.clone());
        tracing::debug!(pid, phase, "terraform started");

        let mut result = ExecResult::default();
        let mut tail = Tail::open(&out_path)?;
        let mut interrupted: Option<Instant> = None;
        let mut killed = false;
        let status = loop {
            for line in tail.lines() {
                self.handle_line(ctx, mode, &line, &mut result);
            }
            if let Some(t) = interrupted {
                if !killed && t.elapsed() > self.s.cancel_grace {
                    ctx.log(format!(
                        "terraform did not stop within {}s of the interrupt: killing it",
                        self.s.cancel_grace.as_secs()
                    ));
                    kill_group(pid);
                    killed = true;
                }
            }
            tokio::select! {
                status = child.wait() => break status,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = ctx.cancel.cancelled(), if interrupted.is_none() => {
                    ctx.log(format!("cancel requested: interrupting terraform {phase}"));
                    interrupt(pid);
                    interrupted = Some(Instant::now());
                }
                _ = ctx.detach.cancelled(), if interrupted.is_none() => {
                    tracing::info!(pid, phase, "leaving terraform running for the next lease holder");
                    // Its slot stays taken until it exits.
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                        drop((permit, running));
                    });
                    return Err(IacError::Detached { phase });
                }
            }
        };
        for line in tail.lines() {
            self.handle_line(ctx, mode, &line, &mut result);
        }
        if let Some(rest) = tail.rest() {
            self.handle_line(ctx, mode, &rest, &mut result);
        }
        // Providers and anything else terraform left in its process group go with it.
        kill_group(pid);
        drop((permit, running));
        let _ = std::fs::remove_file(&pid_file);
        let status = status.map_err(|e| IacError::io(&binary, e))?;
        result.code = status.code().unwrap_or(-1);
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        for l in stderr.lines().filter(|l| !l.trim().is_empty()) {
            ctx.log(l.to_string());
            if result.errors.len() < 20 {
                result.errors.push(redact(l, &ctx.secrets));
            }
        }
        tracing::debug!(pid, phase, code = result.code, "terraform exited");
        if interrupted.is_some() {
            return Err(IacError::Cancelled { phase });
        }
        Ok(result)
    }

    fn handle_line(&self, ctx: &RunCtx, mode: Mode, line: &str, r: &mut ExecResult) {
        match mode {
            Mode::Capture => {
                r.captured.push_str(line);
                r.captured.push('\n');
            }
            Mode::Text => {
                if !line.trim().is_empty() {
                    ctx.log(line.to_string());
                }
            }
            Mode::Json => match serde_json::from_str::<Value>(line) {
                Ok(msg) => handle_message(ctx, &msg, r),
                Err(_) if line.trim().is_empty() => {}
                Err(_) => ctx.log(line.to_string()),
            },
        }
    }
}

struct RunningGuard(Arc<AtomicUsize>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One message of terraform's machine-readable UI.
fn handle_message(ctx: &RunCtx, msg: &Value, r: &mut ExecResult) {
    let ty = msg["type"].as_str().unwrap_or("");
    let text = msg["@message"].as_str().unwrap_or("").to_string();
    match ty {
        "version" | "log" | "refresh_start" | "refresh_complete" => {}
        "outputs" => {
            if let Some(o) = msg["outputs"].as_object() {
                r.outputs = Some(o.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
            }
        }
        "apply_progress" => {
            let _ = ctx.events.send(ExecEvent::Heartbeat);
        }
        "change_summary" => {
            let c = &msg["changes"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            r.planned = Some((n("add"), n("change"), n("remove")));
            let _ = ctx
                .events
                .send(ExecEvent::Planned(n("add") + n("change") + n("remove")));
            ctx.log(text);
        }
        "apply_complete" => {
            r.applied += 1;
            let _ = ctx.events.send(ExecEvent::Applied(r.applied));
            ctx.log(text);
        }
        "planned_change" => {
            let change = &msg["change"];
            r.changes.push(Drift {
                address: change["resource"]["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                action: change["action"].as_str().unwrap_or_default().to_string(),
            });
            ctx.log(text);
        }
        "resource_drift" => {
            let change = &msg["change"];
            r.drift.push(Drift {
                address: change["resource"]["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                action: change["action"].as_str().unwrap_or_default().to_string(),
            });
            ctx.log(text);
        }
        "diagnostic" => {
            let d = &msg["diagnostic"];
            let severity = d["severity"].as_str().unwrap_or("error");
            let summary = d["summary"].as_str().unwrap_or("");
            let detail = d["detail"].as_str().unwrap_or("");
            let address = d["address"].as_str().unwrap_or("");
            let mut line = format!("{severity}: {summary}");
            if !address.is_empty() {
                line.push_str(&format!(" ({address})"));
            }
            if !detail.is_empty() {
                line.push_str(&format!(": {detail}"));
            }
            if severity == "error" && r.errors.len() < 20 {
                r.errors.push(redact(&line, &ctx.secrets));
            }
            ctx.log(line);
        }
        _ => {
            if !text.is_empty() {
                ctx.log(text);
            }
        }
    }
}

fn check(r: &ExecResult, phase: &'static str, ok: i32) -> Result<(), IacError> {
    if r.code == ok {
        Ok(())
    } else {
        Err(failure(r, phase))
    }
}

fn failure(r: &ExecResult, phase: &'static str) -> IacError {
    let mut diagnostics = r.errors.join("; ");
    if diagnostics.is_empty() {
        diagnostics = format!("exit code {}", r.code);
    }
    const MAX: usize = 4000;
    if diagnostics.len() > MAX {
        let mut cut = MAX;
        while !diagnostics.is_char_boundary(cut) {
            cut -= 1;
        }
        diagnostics.truncate(cut);
        diagnostics.push('…');
    }
    let lock_busy = diagnostics.contains("Error acquiring the state lock");
    IacError::Terraform {
        phase,
        diagnostics,
        lock_busy,
    }
}

/// Replaces every occurrence of a secret with `***`.
pub fn redact(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

fn create_private(path: &Path) -> Result<std::fs::File, IacError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| IacError::io(path, e))
}

/// Follows a growing file line by line.
struct Tail {
    file: std::fs::File,
    buf: Vec<u8>,
}

impl Tail {
    fn open(path: &Path) -> Result<Self, IacError> {
        Ok(Self {
            file: std::fs::File::open(path).map_err(|e| IacError::io(path, e))?,
            buf: Vec::new(),
        })
    }

    /// Complete lines written since the last call.
    fn lines(&mut self) -> Vec<String> {
        let mut chunk = Vec::new();
        let _ = self.file.read_to_end(&mut chunk);
        self.buf.extend_from_slice(&chunk);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            out.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        out
    }

    /// A last line without a newline.
    fn rest(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        Some(s)
    }
}

fn read_pid_file(path: &Path) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    Some((pid, start))
}

/// Process start time (clock ticks since boot) and state from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

/// The process exists, is not a zombie, and is the one that was recorded (not a reused pid).
fn alive(pid: i32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((state, s)) if s == start && state != 'Z' && state != 'X')
}

fn interrupt(pid: i32) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        );
    }
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets() {
        assert_eq!(
            redact("token=abcd1234 again abcd1234", &["abcd1234".into()]),
            "token=*** again ***"
        );
        assert_eq!(redact("nothing", &[String::new()]), "nothing");
    }

    #[test]
    fn own_process_is_alive_with_its_start_time() {
        let pid = std::process::id() as i32;
        let start = start_time(pid).expect("own stat");
        assert!(alive(pid, start));
        assert!(
            !alive(pid, start + 1),
            "a reused pid is not the recorded process"
        );
    }

    #[test]
    fn parses_json_ui_messages() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = RunCtx {
            cell_id: "c1".into(),
            job_id: "j".into(),
            attempt: 1,
            cancel: CancellationToken::new(),
            detach: CancellationToken::new(),
            events: tx,
            secrets: vec!["s3cret-value".into()],
        };
        let mut r = ExecResult::default();
        for line in [
            r#"{"type":"change_summary","@message":"Plan: 2 to add, 0 to change, 0 to destroy.","changes":{"add":2,"change":0,"remove":0,"operation":"plan"}}"#,
            r#"{"type":"apply_complete","@message":"terraform_data.process: Creation complete after 1s"}"#,
            r#"{"type":"diagnostic","diagnostic":{"severity":"error","summary":"bad","detail":"token s3cret-value"}}"#,
            r#"{"type":"resource_drift","@message":"x drifted","change":{"resource":{"addr":"aws_s3_bucket.data"},"action":"update"}}"#,
        ] {
            handle_message(&ctx, &serde_json::from_str(line).unwrap(), &mut r);
        }
        assert_eq!(r.planned, Some((2, 0, 0)));
        assert_eq!(r.applied, 1);
        assert_eq!(r.errors, vec!["error: bad: token ***".to_string()]);
        assert_eq!(r.drift[0].address, "aws_s3_bucket.data");
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        assert!(events.contains(&ExecEvent::Planned(2)));
        assert!(events.contains(&ExecEvent::Applied(1)));
        assert!(!format!("{events:?}").contains("s3cret-value"));
    }
}

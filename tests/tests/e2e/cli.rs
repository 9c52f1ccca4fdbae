//! The `cellplane` command line against a running control plane: client commands print
//! tables or JSON, and `up` starts with embedded defaults and a generated admin token.

use cellplane_tests::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn cli(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    app.cli(args)
}

both_backends!(client_commands, |b| async move {
    let app = TestApp::spawn(b).await;
    // Activation places the tenant: it needs an active cell.
    app.stamp_local("euw1-pool-1", serde_json::json!({})).await;
    let run = |args: &'static [&'static str]| cli(&app, args);
    let (code, out, err) = run(&["org", "create", "acme-corp", "--name", "Acme Corp"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ORGANIZATION") && out.contains("acme-corp"),
        "{out}"
    );
    let (code, out, err) = run(&[
        "tenant",
        "create",
        "acme",
        "--org",
        "acme-corp",
        "--region",
        "eu-west-1",
        "--quotas",
        "{\"units\": 2}",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("draft"), "{out}");
    let (code, out, err) = run(&["tenant", "activate", "acme", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    let (code, out, _) = run(&["tenant", "get", "acme", "--json"]);
    assert_eq!(code, 0);
    let t: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(t["state"], "active");
    assert_eq!(t["quotas"]["units"], 2);
    // A new environment of the active tenant is placed by its job.
    let (code, out, err) = run(&["tenant", "env-add", "acme", "--name", "dev", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("placement job") && out.contains("succeeded"),
        "{out}"
    );
    let (code, out, _) = run(&["tenant", "get", "acme"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("dev") && l.contains("euw1-pool-1")),
        "{out}"
    );
    let (code, _, err) = run(&["tenant", "env-add", "acme", "--name", "qa"]);
    assert_ne!(code, 0);
    assert!(err.contains("name"), "{err}");
    let (code, out, _) = run(&["tenant", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().next().unwrap_or("").starts_with("TENANT"),
        "{out}"
    );
    let (code, out, _) = run(&["audit", "verify"]);
    assert_eq!(code, 0);
    assert!(out.contains("intact"), "{out}");
    let (code, out, _) = run(&["job", "list", "--json"]);
    assert_eq!(code, 0);
    let jobs: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The cell's stamp job, the activation and the new environment's placement.
    assert_eq!(jobs.as_array().unwrap().len(), 3);
    let (code, out, _) = run(&["token", "create", "--role", "viewer"]);
    assert_eq!(code, 0);
    assert!(out.contains("cp_"), "{out}");
    // Errors: API refusals exit 1 with the problem detail; usage errors exit 2.
    let (code, _, err) = run(&["tenant", "activate", "acme"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("cannot activate"),
        "{err}"
    );
    let (code, _, err) = run(&["tenant", "get", "../etc"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(&[
        "tenant",
        "create",
        "x1",
        "--org",
        "acme-corp",
        "--region",
        "eu-west-1",
        "--quotas",
        "{bad",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--quotas"), "{err}");
});

#[tokio::test]
async fn up_starts_with_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin_path("cellplane"))
        .args(["up", "--listen", "127.0.0.1:0"])
        .args([
            "--router-listen",
            "127.0.0.1:0",
            "--router-admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .env_remove("CELLPLANE_ADMIN_TOKEN")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Whatever happens below, `up` (and the router and cells it started) must not outlive
    // the test.
    struct Reap(std::process::Child, std::path::PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            kill_processes_under(&self.1);
        }
    }
    let _reap = Reap(child, dir.path().to_path_buf());
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.strip_prefix("listening on ").unwrap().to_string();
    let mut banner = String::new();
    for _ in 0..6 {
        banner.push_str(&lines.next().unwrap().unwrap());
        banner.push('\n');
    }
    std::thread::spawn(move || for _ in lines {});
    let token_path = dir.path().join(".cellplane/admin-token");
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(dir.path().join(".cellplane/cellplane.db").exists());
    assert!(
        banner.contains("sqlite") && banner.contains("admin-token"),
        "{banner}"
    );
    let c = cellplane_api::Client::new(url, Some(token));
    let v = c.audit_verify().await.unwrap();
    assert!(v.ok, "{v:?}");
    // The quick start: a router runs next to the control plane, and after two cells and
    // three tenants, acme's requests are answered by acme's cell.
    let router = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("router:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no router in the banner: {banner}"))
        .to_string();
    for id in ["euw1-pool-1", "euw1-pool-2"] {
        let out: serde_json::Value = c
            .post(
                "/v1/cells",
                &serde_json::json!({"cell_id": id, "region": "eu-west-1", "tier": "pooled",
                    "template": "local", "capacity": {"tenants": 10, "units": 10}}),
            )
            .await
            .unwrap();
        let job = out["job"]["job_id"].as_str().unwrap().to_string();
        let done = c
            .wait_job(&job, std::time::Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(done.state, cellplane_api::JobState::Succeeded, "{done:?}");
    }
    let _: serde_json::Value = c
        .post(
            "/v1/organizations",
            &serde_json::json!({"organization_id": "acme-corp", "name": "Acme"}),
        )
        .await
        .unwrap();
    let mut cells = std::collections::BTreeMap::new();
    for t in ["acme", "globex", "initech"] {
        let _: serde_json::Value = c
            .post(
                "/v1/tenants",
                &serde_json::json!({"tenant_id": t, "organization_id": "acme-corp",
                "profile": "mt-standard", "region": "eu-west-1"}),
            )
            .await
            .unwrap();
        let job = c
            .tenant_action(t, cellplane_api::LifecycleAction::Activate)
            .await
            .unwrap();
        let done = c
            .wait_job(&job.job_id, std::time::Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(done.state, cellplane_api::JobState::Succeeded, "{done:?}");
        let tenant = c.get_tenant(t).await.unwrap();
        cells.insert(t, tenant.environments[0].cell_id.clone().unwrap());
    }
    let http = reqwest::Client::new();
    let answer = eventually(std::time::Duration::from_secs(10), || async {
        let r = http
            .get(format!("{router}/v1/kv/x"))
            .header("host", "acme.localhost")
            .send()
            .await
            .ok()?;
        let cell = r.headers().get("x-cell-id")?.to_str().ok()?.to_string();
        Some(cell)
    })
    .await
    .expect("the router answers for acme");
    assert_eq!(answer, cells["acme"]);
}

// Two control planes on one data directory would run terraform in the same cell dirs (and
// share one SQLite file): the second is refused at start, naming the holder, and the first
// keeps serving. After the first stops, the directory can be used again.
#[tokio::test]
async fn second_control_plane_on_a_data_dir_is_refused() {
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    let pid = app.pid().unwrap();
    let out = Command::new(bin_path("cellplane"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&app.data_dir)
        .env("CELLPLANE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run cellplane");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by another cellplane process")
            && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    app.admin
        .get::<serde_json::Value>("/v1/tenants")
        .await
        .unwrap();
    app.kill9();
    app.start().await.expect("restart after the holder died");
    app.admin
        .get::<serde_json::Value>("/v1/tenants")
        .await
        .unwrap();
}

#[test]
fn completion_prints_a_shell_script() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef cellplane"),
        ("fish", "complete -c cellplane"),
    ] {
        let out = Command::new(bin_path("cellplane"))
            .args(["completion", shell])
            .output()
            .expect("run cellplane");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {out:?}");
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("tenant"), "{shell} completes subcommands");
    }
}

// Logs written to a file (stderr not a terminal) carry no colour escape codes.
#[tokio::test]
async fn logs_to_a_file_are_not_coloured() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.admin
        .get::<serde_json::Value>("/v1/tenants")
        .await
        .unwrap();
    let log = app.log();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains("\x1b["), "escape codes in the log: {log:?}");
}

// `cellplane down --destroy` stops `up`, destroys the cells of its data directory through
// terraform and removes the directory, and leaves another control plane's cells alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_destroy_removes_only_this_data_dirs_cells() {
    let other = TestApp::spawn(Backend::Sqlite).await;
    other
        .stamp_local("euw1-other-1", serde_json::json!({}))
        .await;
    let other_cells: Vec<ProcInfo> = processes_under(&other.cell_dir("euw1-other-1"))
        .into_iter()
        .filter(|p| p.name == "sample-cell")
        .collect();
    assert_eq!(other_cells.len(), 1, "{other_cells:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(bin_path("cellplane"))
        .args(["up", "--listen", "127.0.0.1:0"])
        .args([
            "--router-listen",
            "127.0.0.1:0",
            "--router-admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .env_remove("CELLPLANE_ADMIN_TOKEN")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    struct Reap(std::process::Child, std::path::PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            kill_processes_under(&self.1);
        }
    }
    let mut up = Reap(up, dir.path().to_path_buf());
    let mut lines = BufReader::new(stdout).lines();
    let url = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    // The banner is printed once the router runs and the pid files are written.
    let mut banner = String::new();
    for _ in 0..6 {
        banner.push_str(&lines.next().unwrap().unwrap());
        banner.push('\n');
    }
    std::thread::spawn(move || for _ in lines {});
    let data_dir = dir.path().join(".cellplane");
    let router_pid: i32 = std::fs::read_to_string(data_dir.join("router.pid"))
        .unwrap_or_else(|e| panic!("router.pid: {e}\n{banner}"))
        .trim()
        .parse()
        .unwrap();
    let token = std::fs::read_to_string(data_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let c = cellplane_api::Client::new(url, Some(token));
    let out: serde_json::Value = c
        .post(
            "/v1/cells",
            &serde_json::json!({"cell_id": "euw1-pool-1", "region": "eu-west-1",
                "tier": "pooled", "template": "local",
                "capacity": {"tenants": 10, "units": 10}}),
        )
        .await
        .unwrap();
    let job = out["job"]["job_id"].as_str().unwrap().to_string();
    let done = c
        .wait_job(&job, std::time::Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(done.state, cellplane_api::JobState::Succeeded, "{done:?}");
    // A tenant placed on the cell: `down --destroy` deletes it before the cell.
    let _: serde_json::Value = c
        .post(
            "/v1/organizations",
            &serde_json::json!({"organization_id": "acme-corp", "name": "Acme"}),
        )
        .await
        .unwrap();
    let _: serde_json::Value = c
        .post(
            "/v1/tenants",
            &serde_json::json!({"tenant_id": "acme", "organization_id": "acme-corp",
                "profile": "mt-standard", "region": "eu-west-1"}),
        )
        .await
        .unwrap();
    let job = c
        .tenant_action("acme", cellplane_api::LifecycleAction::Activate)
        .await
        .unwrap();
    let done = c
        .wait_job(&job.job_id, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state, cellplane_api::JobState::Succeeded, "{done:?}");
    let ours: Vec<ProcInfo> = processes_under(&data_dir)
        .into_iter()
        .filter(|p| p.name == "sample-cell")
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");

    let down = Command::new(bin_path("cellplane"))
        .args(["down", "--destroy"])
        .current_dir(dir.path())
        .env_remove("CELLPLANE_ADMIN_TOKEN")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run cellplane down");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&down.stdout),
        String::from_utf8_lossy(&down.stderr),
    );
    assert!(down.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("destroyed cell euw1-pool-1"), "{stdout}");
    // `up` and its router were stopped by SIGTERM and exited.
    let status = up.0.try_wait().unwrap();
    assert!(
        status.is_some(),
        "cellplane up still runs: {stdout}{stderr}"
    );
    assert!(!alive(router_pid), "the router still runs");
    for p in &ours {
        assert!(
            !alive(p.pid),
            "this data dir's sample-cell still runs: {p:?}"
        );
    }
    assert!(!data_dir.exists(), "the data dir is removed");
    for p in &other_cells {
        assert!(
            alive(p.pid),
            "another data dir's sample-cell was stopped: {p:?}"
        );
    }
    other
        .admin
        .get::<serde_json::Value>("/v1/cells/euw1-other-1")
        .await
        .unwrap();
}

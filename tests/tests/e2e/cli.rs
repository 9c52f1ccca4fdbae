//! The `cellplane` command line against a running control plane: client commands print
//! tables or JSON, and `up` starts with embedded defaults and a generated admin token.

use cellplane_tests::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn cli(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("cellplane"))
        .args(args)
        .env("CELLPLANE_URL", &app.url)
        .env("CELLPLANE_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run cellplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    assert_eq!(jobs.as_array().unwrap().len(), 1);
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
        .current_dir(dir.path())
        .env_remove("CELLPLANE_ADMIN_TOKEN")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.strip_prefix("listening on ").unwrap().to_string();
    let mut banner = String::new();
    for _ in 0..6 {
        banner.push_str(&lines.next().unwrap().unwrap());
        banner.push('\n');
    }
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
    assert!(v.ok);
    let _ = child.kill();
    let _ = child.wait();
}

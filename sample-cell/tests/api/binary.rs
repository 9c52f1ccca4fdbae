//! The real binary: announces its port, drains on SIGTERM, refuses bad flags.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::both_backends;
use crate::helpers::{Backend, TestDb, ADMIN_TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_sample-cell");

both_backends!(binary_announces_its_port_and_drains_on_sigterm);

/// Spawn the binary and read its `listening on http://ADDR` line.
async fn spawn_binary(args: &[String]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("SAMPLE_CELL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sample-cell");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("announces within 30s")
        .expect("reads stdout")
        .expect("prints a line");
    let base = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, base)
}

fn terminate(child: &Child) {
    let pid = child.id().expect("child is running");
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("send SIGTERM");
}

async fn binary_announces_its_port_and_drains_on_sigterm(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--cell-id",
        "bin-cell",
        "--app-version",
        "9.9.9",
        "--extra-latency-ms",
        "700",
        "--admin-token",
        ADMIN_TOKEN,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(db.args());
    let (mut child, base) = spawn_binary(&args).await;
    assert!(
        base.starts_with("http://127.0.0.1:") && !base.ends_with(":0"),
        "{base}"
    );

    let client = reqwest::Client::new();
    let health = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("answered");
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.headers()["x-cell-id"], "bin-cell");
    assert_eq!(health.headers()["x-app-version"], "9.9.9");

    // A slow in-flight write finishes although SIGTERM arrives while it is delayed.
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/v1/kv/drained");
        async move {
            client
                .put(url)
                .header("X-Tenant-ID", "acme")
                .body("ok")
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    terminate(&child);
    let response = in_flight
        .await
        .expect("joins")
        .expect("in-flight request answered");
    assert_eq!(response.status(), StatusCode::CREATED);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within 15s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "graceful exit, got {status:?}");
    // New connections are refused once it stopped.
    assert!(client.get(format!("{base}/healthz")).send().await.is_err());

    // The write was committed before the exit.
    let app = db.spawn().await;
    assert_eq!(app.value("acme", "drained").await, Some(b"ok".to_vec()));
}

#[tokio::test]
async fn bad_flags_exit_2_naming_the_flag() {
    for (args, flag) in [
        (&["--fault-rate", "1.5"][..], "--fault-rate"),
        (&["--fault-rate", "lots"][..], "--fault-rate"),
        (&["--cell-id", "Bad_Cell"][..], "--cell-id"),
        (&["--listen", "nowhere"][..], "--listen"),
        (&["--database-url", "mysql://x"][..], "--database-url"),
    ] {
        let output = Command::new(BIN)
            .args(args)
            .env_remove("SAMPLE_CELL_LOG")
            .output()
            .await
            .expect("run sample-cell");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed to stdout");
    }
}

/// Runs the binary with `args` under `script`, which gives it a terminal, and returns what
/// it wrote there; `None` where `script` (util-linux) is not installed.
fn on_a_terminal(args: &[&str], no_color: Option<&str>) -> Option<String> {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let line = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .env("SAMPLE_CELL_LOG", "info");
    match no_color {
        Some(v) => cmd.env("NO_COLOR", v),
        None => cmd.env_remove("NO_COLOR"),
    };
    match cmd.output() {
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("run script: {e}"),
    }
}

// Log lines are coloured on a terminal only, and not even there when NO_COLOR is set and
// not empty (https://no-color.org); piped, they are plain.
#[tokio::test]
async fn logs_are_coloured_only_on_a_terminal_without_no_color() {
    let dir = tempfile::tempdir().expect("temp dir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"not a directory").expect("write");
    let data = blocker.join("data");
    let data = data.to_str().expect("utf-8 temp path");
    let args = ["--listen", "127.0.0.1:0", "--data-dir", data];
    let piped = Command::new(BIN)
        .args(args)
        .env("SAMPLE_CELL_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .await
        .expect("run sample-cell");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(stderr.contains("startup failed"), "{stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "colour in piped logs: {stderr:?}"
    );
    let Some(coloured) = on_a_terminal(&args, None) else {
        eprintln!("skipping the terminal half: `script` is not installed");
        return;
    };
    assert!(coloured.contains("startup failed"), "{coloured:?}");
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal: {coloured:?}"
    );
    for no_color in ["1", "true"] {
        let plain = on_a_terminal(&args, Some(no_color)).expect("script ran before");
        assert!(plain.contains("startup failed"), "{plain:?}");
        assert!(!plain.contains("\x1b["), "NO_COLOR={no_color}: {plain:?}");
    }
}

#[tokio::test]
async fn startup_failure_exits_1_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"not a directory").expect("write");
    let output = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(blocker.join("data"))
        .output()
        .await
        .expect("run sample-cell");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("data directory"), "{stderr}");
}

//! Commands in the runbooks run as written. A fenced `sh` block right after a line
//! `<!-- runnable -->` is run with bash (`-euo pipefail`), in order, against a control plane
//! started for the file (`CELLPLANE_URL`, `CELLPLANE_TOKEN` and `PATH` with the built
//! binaries set as a reader of the runbook would have them).

use cellplane_tests::*;
use std::path::Path;

/// The runnable blocks of a markdown file, in order.
pub fn runnable_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = markdown.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "<!-- runnable -->" {
            continue;
        }
        let Some(fence) = lines.next() else { break };
        let indent = fence.len() - fence.trim_start().len();
        assert!(
            fence.trim_start().starts_with("```sh"),
            "a runnable marker must precede a ```sh block, found {fence:?}"
        );
        let mut block = String::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            block.push_str(l.get(indent..).unwrap_or(l.trim_start()));
            block.push('\n');
        }
        out.push(block);
    }
    out
}

fn run_blocks(file: &Path, app: &TestApp, cwd: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let blocks = runnable_blocks(&text);
    assert!(
        !blocks.is_empty(),
        "{} has no runnable block",
        file.display()
    );
    let bin_dir = bin_path("cellplane").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (i, block) in blocks.iter().enumerate() {
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", block])
            .current_dir(cwd)
            .env("PATH", &path)
            .env("CELLPLANE_URL", &app.url)
            .env("CELLPLANE_TOKEN", ADMIN_TOKEN)
            .env("CELLPLANE_DATA_DIR", &app.data_dir)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{} block {} failed ({}):\n{block}\n--- stdout\n{}\n--- stderr\n{}\n--- control plane log\n{}",
            file.display(),
            i + 1,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            app.log()
        );
    }
}

#[test]
fn runnable_markers_are_found() {
    let md = "text\n<!-- runnable -->\n```sh\necho a\necho b\n```\n```sh\nnot this\n```\n   <!-- runnable -->\n   ```sh\n   echo c\n   ```\n";
    assert_eq!(runnable_blocks(md), vec!["echo a\necho b\n", "echo c\n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_commands_run_as_written() {
    let root = repo_root();
    for name in [
        "place-and-route.md",
        "stamp-a-cell.md",
        "webhooks.md",
        "move-a-tenant.md",
        "roll-out-a-release.md",
        "rollback.md",
    ] {
        // The webhooks runbook's receiver listens on loopback.
        // The move runbook drains a cell whose tenant was just moved: a short purge grace
        // lets that move end (and the tenant be moved again) within the test.
        let options = AppOptions::default()
            .with("CELLPLANE__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true")
            .with("CELLPLANE__MOVES__PURGE_GRACE_SECS", "1");
        let app = TestApp::spawn_with(Backend::Sqlite, options).await;
        // Outside the source tree: commands find their templates in the binary.
        let cwd = tempfile::tempdir().unwrap();
        run_blocks(&root.join("runbooks").join(name), &app, cwd.path());
        kill_processes_under(&app.data_dir);
    }
}

/// The README's quick start, as a new user runs it: `cellplane up` in an empty directory
/// (its default ports 7480, 8080 and 9090; no other test uses them), then the second block
/// in another shell, then `cellplane down --destroy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_runs_as_written() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = runnable_blocks(&text);
    assert_eq!(
        blocks.len(),
        1,
        "the README's quick start block is marked runnable"
    );
    let cwd = tempfile::tempdir().unwrap();
    let bin_dir = bin_path("cellplane").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(cwd.path().join("up.log")).unwrap();
    let mut up = std::process::Command::new(bin_path("cellplane"))
        .arg("up")
        .current_dir(cwd.path())
        .env("PATH", &path)
        .env_remove("CELLPLANE_ADMIN_TOKEN")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cellplane up");
    let ready = eventually(std::time::Duration::from_secs(60), || async {
        let r = reqwest::get("http://127.0.0.1:7480/healthz").await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let up_log = || std::fs::read_to_string(cwd.path().join("up.log")).unwrap_or_default();
    assert!(ready.is_ok(), "cellplane up did not answer:\n{}", up_log());
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &blocks[0]])
        .current_dir(cwd.path())
        .env("PATH", &path)
        .env_remove("CELLPLANE_URL")
        .env_remove("CELLPLANE_TOKEN")
        .output()
        .expect("bash");
    let down = std::process::Command::new(bin_path("cellplane"))
        .args(["down", "--destroy"])
        .current_dir(cwd.path())
        .env("PATH", &path)
        .output()
        .expect("cellplane down");
    let _ = up.kill();
    let _ = up.wait();
    kill_processes_under(cwd.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the quick start failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}\n--- up\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        up_log()
    );
    assert!(
        stdout.contains("HTTP/1.1 403"),
        "suspended tenant answered 403:\n{stdout}"
    );
    assert!(
        down.status.success(),
        "cellplane down --destroy: {}",
        String::from_utf8_lossy(&down.stderr)
    );
}

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
    for name in ["place-and-route.md", "stamp-a-cell.md"] {
        let app = TestApp::spawn(Backend::Sqlite).await;
        run_blocks(&root.join("runbooks").join(name), &app, &root);
        kill_processes_under(&app.data_dir);
    }
}

//! The built-in cell templates (`cell-templates/local` and `cell-templates/aws`), compiled
//! into the binary so an installed `cellplane` (copied to /usr/local/bin, `cargo install`)
//! can stamp cells without a source tree. They are written out on first use under
//! `<data_dir>/templates/builtin/<name>/`, and rewritten when the embedded content differs.

use std::path::{Path, PathBuf};

/// (path under `cell-templates/`, content). Every file of every built-in template.
pub const FILES: &[(&str, &[u8])] = &[
    (
        "local/template.toml",
        include_bytes!("../../../../cell-templates/local/template.toml"),
    ),
    (
        "local/main.tf.tera",
        include_bytes!("../../../../cell-templates/local/main.tf.tera"),
    ),
    (
        "local/start.sh",
        include_bytes!("../../../../cell-templates/local/start.sh"),
    ),
    (
        "local/stop.sh",
        include_bytes!("../../../../cell-templates/local/stop.sh"),
    ),
    (
        "aws/template.toml",
        include_bytes!("../../../../cell-templates/aws/template.toml"),
    ),
    (
        "aws/main.tf.tera",
        include_bytes!("../../../../cell-templates/aws/main.tf.tera"),
    ),
];

/// Writes the built-in templates into `<data_dir>/templates/builtin` (only the files whose
/// content differs, and removing files a template no longer has) and returns that directory.
pub fn materialize(data_dir: &Path) -> std::io::Result<PathBuf> {
    let root = data_dir.join("templates").join("builtin");
    let mut names: Vec<&str> = FILES
        .iter()
        .filter_map(|(p, _)| p.split('/').next())
        .collect();
    names.dedup();
    for name in names {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let ours: Vec<&(&str, &[u8])> = FILES
            .iter()
            .filter(|(p, _)| p.split('/').next() == Some(name))
            .collect();
        // Files left from an older built-in version.
        for e in std::fs::read_dir(&dir)?.flatten() {
            let rel = format!("{name}/{}", e.file_name().to_string_lossy());
            if !ours.iter().any(|(p, _)| *p == rel) {
                let path = e.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
        }
        for (rel, content) in ours {
            let path = root.join(rel);
            if std::fs::read(&path).ok().as_deref() != Some(*content) {
                std::fs::write(&path, content)?;
            }
            if rel.ends_with(".sh") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_source_templates_is_embedded() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cell-templates");
        let mut on_disk = Vec::new();
        for name in ["local", "aws"] {
            for e in std::fs::read_dir(src.join(name)).unwrap().flatten() {
                on_disk.push(format!("{name}/{}", e.file_name().to_string_lossy()));
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(
            embedded, on_disk,
            "add new template files to iac::builtin::FILES"
        );
    }

    #[test]
    fn materialize_writes_rewrites_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = materialize(tmp.path()).unwrap();
        let start = root.join("local/start.sh");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&start).unwrap().permissions().mode() & 0o111,
            0o111
        );
        std::fs::write(root.join("local/template.toml"), "edited").unwrap();
        std::fs::write(root.join("local/stale.tf"), "old").unwrap();
        materialize(tmp.path()).unwrap();
        assert_eq!(
            std::fs::read(root.join("local/template.toml")).unwrap(),
            FILES[0].1
        );
        assert!(!root.join("local/stale.tf").exists());
        assert!(root.join("aws/main.tf.tera").exists());
    }
}

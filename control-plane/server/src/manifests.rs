//! Reading manifests: YAML streams (`---`-separated) or JSON lists into typed documents,
//! with every problem named by the document's index and field (and line and column for
//! YAML syntax). Pure: no I/O, nothing from the registry.

use cellplane_api::manifests::{
    CellSpec, Document, FieldChange, Kind, OrganizationSpec, RegionPolicySpec, TenantSpec,
    API_VERSION,
};
use cellplane_api::FieldError;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Most bytes one document may take.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// Most documents one apply may carry.
pub const MAX_DOCUMENTS: usize = 5000;

/// A document's typed spec.
#[derive(Debug, Clone)]
pub enum Spec {
    Organization(OrganizationSpec),
    RegionPolicy(Box<RegionPolicySpec>),
    Cell(Box<CellSpec>),
    Tenant(Box<TenantSpec>),
}

/// A document read and typed; `index` is its position in the request.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub index: usize,
    pub doc: Document,
    pub spec: Spec,
}

fn err(field: String, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// Splits a YAML stream at its `---` lines: each piece with the (1-based) line it starts on.
fn split_yaml(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t") {
            out.push((start, std::mem::take(&mut current)));
            start = i + 2;
            // `--- {inline}` keeps its content.
            let rest = trimmed.strip_prefix("---").unwrap_or("").trim();
            if !rest.is_empty() {
                current.push_str(rest);
                current.push('\n');
            }
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    out.push((start, current));
    out
}

/// Whether a YAML piece holds nothing but comments and blank lines.
fn is_blank_yaml(piece: &str) -> bool {
    piece.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

/// Values read, each with its document index, and the documents that could not be read.
pub type Read = (Vec<(usize, Value)>, Vec<FieldError>);

/// Reads a YAML stream into JSON values, one per non-empty document. A document that
/// cannot be read is reported and the others are still read.
pub fn read_yaml(text: &str) -> Read {
    let mut values = Vec::new();
    let mut errors = Vec::new();
    for (start, piece) in split_yaml(text) {
        if is_blank_yaml(&piece) {
            continue;
        }
        let index = values.len() + errors.len();
        let field = format!("documents[{index}]");
        if piece.len() > MAX_DOCUMENT_BYTES {
            errors.push(err(
                field,
                format!(
                    "document starting at line {start} is {} bytes; at most {MAX_DOCUMENT_BYTES}",
                    piece.len()
                ),
            ));
            continue;
        }
        match serde_yaml_ng::from_str::<Value>(&piece) {
            Ok(v) => values.push((index, v)),
            Err(e) => {
                let at = e
                    .location()
                    .map(|l| format!("line {} column {}", l.line() + start - 1, l.column()))
                    .unwrap_or_else(|| format!("the document starting at line {start}"));
                let msg = e.to_string();
                // The library's own position is relative to the piece: say ours instead.
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                errors.push(err(field, format!("YAML syntax error at {at}: {msg}")));
            }
        }
        if values.len() + errors.len() > MAX_DOCUMENTS {
            return (
                Vec::new(),
                vec![err(
                    "documents".into(),
                    format!("at most {MAX_DOCUMENTS} documents per apply"),
                )],
            );
        }
    }
    (values, errors)
}

/// Reads a JSON list of documents.
pub fn read_json(body: &[u8]) -> Read {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                Vec::new(),
                vec![err(
                    "body".into(),
                    format!(
                        "invalid JSON at line {} column {}: {e}",
                        e.line(),
                        e.column()
                    ),
                )],
            )
        }
    };
    let Value::Array(items) = v else {
        return (
            Vec::new(),
            vec![err(
                "body".into(),
                "must be a list of documents (or YAML with Content-Type: application/yaml)",
            )],
        );
    };
    if items.len() > MAX_DOCUMENTS {
        return (
            Vec::new(),
            vec![err(
                "documents".into(),
                format!("at most {MAX_DOCUMENTS} documents per apply"),
            )],
        );
    }
    let mut values = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let n = serde_json::to_vec(&item).map(|b| b.len()).unwrap_or(0);
        if n > MAX_DOCUMENT_BYTES {
            errors.push(err(
                format!("documents[{i}]"),
                format!("document is {n} bytes; at most {MAX_DOCUMENT_BYTES}"),
            ));
        } else {
            values.push((i, item));
        }
    }
    (values, errors)
}

/// Deserializes `value` as `T`, naming the failing field below `prefix`.
fn typed<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, FieldError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let mut field = if path == "." || path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{path}")
        };
        // An unknown field is named in full, not by its parent.
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            if let Some(name) = rest.split('`').next() {
                if !field.ends_with(&format!(".{name}")) {
                    field = format!("{field}.{name}");
                }
            }
        }
        err(field, inner)
    })
}

/// Types every value; problems are named `documents[i].<field>`. Two documents for the same
/// object are refused.
pub fn type_documents(values: Vec<(usize, Value)>) -> (Vec<Parsed>, Vec<FieldError>) {
    let mut out = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (index, value) in values {
        let at = format!("documents[{index}]");
        if !value.is_object() {
            errors.push(err(
                at,
                "must be a mapping with apiVersion, kind, metadata, spec",
            ));
            continue;
        }
        if let Some(v) = value.get("apiVersion") {
            if v.as_str() != Some(API_VERSION) {
                errors.push(err(
                    format!("{at}.apiVersion"),
                    format!("must be {API_VERSION:?}, not {v}"),
                ));
                continue;
            }
        }
        let doc: Document = match typed(value, &at) {
            Ok(d) => d,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let spec_at = format!("{at}.spec");
        let spec = match doc.kind {
            Kind::Organization => typed(doc.spec.clone(), &spec_at).map(Spec::Organization),
            Kind::RegionPolicy => {
                typed(doc.spec.clone(), &spec_at).map(|s| Spec::RegionPolicy(Box::new(s)))
            }
            Kind::Cell => typed(doc.spec.clone(), &spec_at).map(|s| Spec::Cell(Box::new(s))),
            Kind::Tenant => typed(doc.spec.clone(), &spec_at).map(|s| Spec::Tenant(Box::new(s))),
        };
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let key = (doc.kind, doc.metadata.name.as_str().to_string());
        if let Some(first) = seen.insert(key, index) {
            errors.push(err(
                format!("{at}.metadata.name"),
                format!(
                    "{} {:?} is also documents[{first}]",
                    doc.kind.as_str(),
                    doc.metadata.name.as_str()
                ),
            ));
            continue;
        }
        out.push(Parsed { index, doc, spec });
    }
    (out, errors)
}

/// Field-level differences from `from` to `to` below `path`; objects are compared key by
/// key, anything else as a whole.
pub fn diff(path: &str, from: &Value, to: &Value, out: &mut Vec<FieldChange>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&p, x, y, out),
                    (x, y) => out.push(FieldChange {
                        path: p,
                        from: x.cloned(),
                        to: y.cloned(),
                    }),
                }
            }
        }
        (a, b) if a != b => out.push(FieldChange {
            path: path.to_string(),
            from: Some(a.clone()),
            to: Some(b.clone()),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_stream_splits_and_skips_empty_documents() {
        let text = "---\napiVersion: cellplane.dev/v1\nkind: Organization\nmetadata: {name: acme-corp}\nspec: {name: Acme}\n---\n# only a comment\n---\napiVersion: cellplane.dev/v1\nkind: Organization\nmetadata: {name: globex}\nspec: {name: Globex}\n";
        let (values, errors) = read_yaml(text);
        assert!(errors.is_empty());
        assert_eq!(values.len(), 2);
        let (parsed, errors) = type_documents(values);
        assert!(errors.is_empty());
        assert_eq!(parsed[1].doc.metadata.name.as_str(), "globex");
    }

    #[test]
    fn yaml_syntax_errors_name_the_line_in_the_whole_stream() {
        let text = "kind: Organization\n---\nkind: Tenant\nmetadata: [unclosed\n";
        let (values, errors) = read_yaml(text);
        assert_eq!(values.len(), 1);
        assert_eq!(errors[0].field, "documents[1]");
        assert!(errors[0].message.contains("line "), "{}", errors[0].message);
        // The piece starts on line 3; its error is on line 4 or 5 of the stream.
        assert!(
            errors[0].message.contains("line 4") || errors[0].message.contains("line 5"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn unknown_fields_and_wrong_versions_are_named() {
        let v = serde_json::json!([
            {"apiVersion": "cellplane.dev/v1", "kind": "Tenant", "metadata": {"name": "acme"},
             "spec": {"organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1",
                      "quotas": {"apiRatelimit": 5}}},
            {"apiVersion": "cellplane.dev/v2", "kind": "Tenant", "metadata": {"name": "b"}, "spec": {}},
            {"apiVersion": "cellplane.dev/v1", "kind": "Pod", "metadata": {"name": "c"}, "spec": {}},
            {"apiVersion": "cellplane.dev/v1", "kind": "Organization", "metadata": {"name": "Bad_Id"}, "spec": {"name": "x"}}
        ]);
        let (values, _) = read_json(v.to_string().as_bytes());
        let (_, errors) = type_documents(values);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "documents[0].spec.quotas.apiRatelimit",
                "documents[1].apiVersion",
                "documents[2].kind",
                "documents[3].metadata.name"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn oversized_documents_are_refused() {
        let big = "x".repeat(MAX_DOCUMENT_BYTES + 10);
        let text = format!("kind: Organization\nspec: {{name: {big}}}\n");
        let (_, errors) = read_yaml(&text);
        assert_eq!(errors[0].field, "documents[0]");
    }

    #[test]
    fn diff_names_nested_fields() {
        let mut out = Vec::new();
        diff(
            "spec",
            &serde_json::json!({"quotas": {"apiRateLimit": 200, "units": 1}, "state": "active"}),
            &serde_json::json!({"quotas": {"apiRateLimit": 5, "units": 1}, "state": "active"}),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].path, "spec.quotas.apiRateLimit");
    }
}

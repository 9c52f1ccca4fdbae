//! Cell templates: `cell-templates/<name>/template.toml` (description, tiers, variables,
//! required outputs) plus `*.tf.tera` files rendered with Tera, and static files (scripts)
//! copied as they are.
//!
//! Rendering is deterministic (sorted maps, sorted files) and safe by construction: values
//! reach terraform only through `cellplane.auto.tfvars.json`; Tera autoescapes every printed
//! value with [`hcl_escape`] and the `hcl` filter prints any value as an HCL literal;
//! sensitive values are not in the render context at all; every rendered `.tf` file is
//! re-parsed with hcl-rs and only known top-level blocks are accepted. This module never
//! runs terraform.

use cellplane_api::{validate_id, Cell, FieldError, TemplateInfo, TemplateVariable, Tier};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The tfvars file cellplane writes; the only way values reach terraform.
pub const TFVARS_FILE: &str = "cellplane.auto.tfvars.json";
/// Variable declarations cellplane generates from the manifest.
pub const VARIABLES_FILE: &str = "cellplane_variables.tf";
/// The state backend block (PostgreSQL store only).
pub const BACKEND_FILE: &str = "cellplane_backend.tf";

/// Variables every stack receives, whatever its template declares.
pub const BUILTIN_VARIABLES: &[(&str, &str)] = &[
    ("cell_id", "string"),
    ("region", "string"),
    ("tier", "string"),
    ("app_version", "string"),
    ("labels", "map(string)"),
    ("capacity", "object({ tenants = number, units = number })"),
    ("resource_mapping", "map(string)"),
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0:?} does not exist")]
    Unknown(String),
    #[error("template {name:?} is invalid: {message}")]
    Invalid { name: String, message: String },
    #[error("cannot read template {name:?}: {message}")]
    Read { name: String, message: String },
    #[error("rendering template {name:?} failed: {message}")]
    Render { name: String, message: String },
    #[error("the rendered file {file} is not valid HCL: {message}")]
    Reparse { file: String, message: String },
    #[error("variables are invalid")]
    Variables(Vec<FieldError>),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    String,
    Number,
    Bool,
    List,
    Map,
}

impl VarType {
    pub fn as_str(self) -> &'static str {
        match self {
            VarType::String => "string",
            VarType::Number => "number",
            VarType::Bool => "bool",
            VarType::List => "list",
            VarType::Map => "map",
        }
    }
    fn hcl_type(self) -> &'static str {
        match self {
            VarType::String => "string",
            VarType::Number => "number",
            VarType::Bool => "bool",
            VarType::List => "list(string)",
            VarType::Map => "map(string)",
        }
    }
}

/// Values the control plane supplies instead of the user.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VarSource {
    /// A free TCP port on 127.0.0.1, allocated once and recorded in the cell's vars.
    Port,
    /// A random secret, generated once and kept out of the API.
    Secret,
    /// `<cell working dir>/run`: where the cell's processes keep their files.
    CellDir,
    /// Path of the `sample-cell` binary.
    SampleCellBin,
}

impl VarSource {
    pub fn as_str(self) -> &'static str {
        match self {
            VarSource::Port => "port",
            VarSource::Secret => "secret",
            VarSource::CellDir => "cell_dir",
            VarSource::SampleCellBin => "sample_cell_bin",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarSpec {
    #[serde(rename = "type")]
    pub type_: VarType,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub sensitive: bool,
    #[serde(default)]
    pub source: Option<VarSource>,
    #[serde(default)]
    pub validation: Option<Validation>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub description: String,
    pub tiers: Vec<Tier>,
    #[serde(default)]
    pub default_app_version: Option<String>,
    #[serde(default)]
    pub required_outputs: Vec<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, VarSpec>,
}

/// A loaded template: its manifest, Tera sources and static files.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub manifest: Manifest,
    /// `main.tf.tera` → source.
    sources: BTreeMap<String, String>,
    /// `start.sh` → bytes, copied verbatim.
    statics: BTreeMap<String, Vec<u8>>,
    /// Compiled patterns of the variables' validation rules.
    patterns: HashMap<String, regex::Regex>,
}

/// The template directory. Templates are read when used, so an edit takes effect on the
/// next render without a restart.
#[derive(Debug, Clone)]
pub struct Catalog {
    dir: PathBuf,
}

impl Catalog {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of the templates in the directory, sorted.
    pub fn names(&self) -> Result<Vec<String>, TemplateError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(TemplateError::Read {
                    name: self.dir.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("template.toml").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| validate_id(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Loads template `name`; the name must be an identifier, so it can never walk out of
    /// the template directory.
    pub fn load(&self, name: &str) -> Result<Template, TemplateError> {
        if validate_id(name).is_err() {
            return Err(TemplateError::Unknown(name.to_string()));
        }
        let dir = self.dir.join(name);
        let manifest_path = dir.join("template.toml");
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::Unknown(name.to_string()))
            }
            Err(e) => {
                return Err(TemplateError::Read {
                    name: name.into(),
                    message: e.to_string(),
                })
            }
        };
        let invalid = |message: String| TemplateError::Invalid {
            name: name.to_string(),
            message,
        };
        let manifest: Manifest = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut patterns = HashMap::new();
        for (var, spec) in &manifest.variables {
            if !is_var_name(var) {
                return Err(invalid(format!(
                    "variable {var:?} is not [a-z][a-z0-9_]{{0,62}}"
                )));
            }
            if BUILTIN_VARIABLES.iter().any(|(b, _)| b == var) {
                return Err(invalid(format!("variable {var:?} is a builtin")));
            }
            if let Some(p) = spec.validation.as_ref().and_then(|v| v.pattern.as_ref()) {
                let re = regex::Regex::new(p)
                    .map_err(|e| invalid(format!("variable {var}: bad pattern: {e}")))?;
                patterns.insert(var.clone(), re);
            }
        }
        if manifest.tiers.is_empty() {
            return Err(invalid("tiers must not be empty".into()));
        }
        let mut sources = BTreeMap::new();
        let mut statics = BTreeMap::new();
        let rd = std::fs::read_dir(&dir).map_err(|e| TemplateError::Read {
            name: name.into(),
            message: e.to_string(),
        })?;
        for entry in rd.filter_map(|e| e.ok()) {
            let Some(file) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let path = entry.path();
            if !path.is_file() || file == "template.toml" || file.starts_with('.') {
                continue;
            }
            let read_err = |e: std::io::Error| TemplateError::Read {
                name: name.into(),
                message: format!("{file}: {e}"),
            };
            if file.ends_with(".tf.tera") {
                let text = std::fs::read_to_string(&path).map_err(read_err)?;
                sources.insert(file, text);
            } else if file.ends_with(".tf") || file.ends_with(".tf.json") {
                return Err(invalid(format!(
                    "{file}: stacks are rendered; name it {file}.tera"
                )));
            } else {
                let bytes = std::fs::read(&path).map_err(read_err)?;
                statics.insert(file, bytes);
            }
        }
        if sources.is_empty() {
            return Err(invalid("no *.tf.tera file".into()));
        }
        Ok(Template {
            name: name.to_string(),
            manifest,
            sources,
            statics,
            patterns,
        })
    }
}

fn is_var_name(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 63
        && k.as_bytes()[0].is_ascii_lowercase()
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Values the control plane knows about the host, for variables with a `source`.
#[derive(Debug, Clone)]
pub struct SystemValues {
    pub cell_dir: PathBuf,
    pub sample_cell_bin: Option<PathBuf>,
}

/// Everything a render needs.
#[derive(Debug, Clone)]
pub struct RenderInput<'a> {
    pub cell: &'a Cell,
    /// Secrets recorded for the cell (values of `source = "secret"` variables).
    pub secrets: &'a BTreeMap<String, Value>,
    pub system: SystemValues,
    /// Emit a `pg` backend block (state in PostgreSQL, connection from the environment).
    pub pg_backend: bool,
}

/// The files of a rendered stack, by relative name, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedStack {
    pub files: BTreeMap<String, Vec<u8>>,
    /// Values of sensitive variables, to redact from logs.
    pub secrets: Vec<String>,
}

impl RenderedStack {
    /// A digest of the stack's configuration (its `.tf` files, not the variable values):
    /// what `terraform init` depends on.
    pub fn config_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, content) in self.files.iter().filter(|(n, _)| n.ends_with(".tf")) {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(content);
            h.update([0]);
        }
        hex::encode(h.finalize())
    }

    /// Writes the stack into `dir`, first removing files an earlier render left that this
    /// one does not have (terraform's own files and the state are kept).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let ours = name.ends_with(".tf")
                || name.ends_with(".sh")
                || name.ends_with(".tf.json")
                || name == TFVARS_FILE;
            if ours && entry.path().is_file() && !self.files.contains_key(&name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        for (name, content) in &self.files {
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_deref() == Some(content.as_slice()) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, content)?;
            // The tfvars hold secrets: owner only.
            let mode = if name == TFVARS_FILE { 0o600 } else { 0o644 };
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }
}

/// Escapes `s` for use inside a double-quoted HCL string: quotes, backslashes and control
/// characters are escaped and template sequences (`${`, `%{`) are doubled, so the value
/// stays an inert string whatever it contains.
pub fn hcl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' | '%' if chars.peek() == Some(&'{') => {
                out.push(c);
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Any JSON value as an HCL expression literal.
pub fn hcl_literal(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("\"{}\"", hcl_escape(s)),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(hcl_literal).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("\"{}\" = {}", hcl_escape(k), hcl_literal(v)))
                .collect();
            format!("{{ {} }}", parts.join(", "))
        }
    }
}

/// The Tera `hcl` filter: prints its input as an HCL literal (a quoted, escaped string for
/// strings). Its output is final, so autoescaping does not touch it again.
struct HclFilter;

impl tera::Filter for HclFilter {
    fn filter(&self, value: &Value, _: &HashMap<String, Value>) -> tera::Result<Value> {
        Ok(Value::String(hcl_literal(value)))
    }
    fn is_safe(&self) -> bool {
        true
    }
}

/// The resource mapping of a cell: where the data of the tenants it serves lives. Pooled
/// and dedicated cells get the same keys with different values, so one template serves
/// both.
pub fn cell_resource_mapping(cell_id: &str, tier: Tier) -> BTreeMap<String, String> {
    let ident = cell_id.replace('-', "_");
    let mut m = BTreeMap::new();
    match tier {
        Tier::Pooled => {
            m.insert("strategy".into(), "pooled".into());
            m.insert("database".into(), "warehouse_shared".into());
            m.insert("schema_prefix".into(), "t_".into());
            m.insert("bucket".into(), format!("cells-{cell_id}"));
            m.insert("object_prefix".into(), "tenants/".into());
            m.insert("queue".into(), format!("jobs-{cell_id}"));
        }
        Tier::Dedicated => {
            m.insert("strategy".into(), "dedicated".into());
            m.insert("database".into(), format!("warehouse_{ident}"));
            m.insert("schema_prefix".into(), String::new());
            m.insert("bucket".into(), format!("data-{cell_id}"));
            m.insert("object_prefix".into(), String::new());
            m.insert("queue".into(), format!("jobs-{cell_id}"));
        }
    }
    m
}

fn type_matches(t: VarType, v: &Value) -> bool {
    let scalar = |v: &Value| v.is_string() || v.is_number() || v.is_boolean();
    match t {
        VarType::String => v.is_string(),
        VarType::Number => v.is_number(),
        VarType::Bool => v.is_boolean(),
        VarType::List => v.as_array().is_some_and(|a| a.iter().all(scalar)),
        VarType::Map => v.as_object().is_some_and(|m| m.values().all(scalar)),
    }
}

impl Template {
    pub fn info(&self) -> TemplateInfo {
        TemplateInfo {
            name: self.name.clone(),
            description: self.manifest.description.clone(),
            tiers: self.manifest.tiers.clone(),
            default_app_version: self.manifest.default_app_version.clone(),
            required_outputs: self.manifest.required_outputs.clone(),
            variables: self
                .manifest
                .variables
                .iter()
                .map(|(name, s)| TemplateVariable {
                    name: name.clone(),
                    type_: s.type_.as_str().into(),
                    default: if s.sensitive { None } else { s.default.clone() },
                    description: s.description.clone(),
                    required: s.default.is_none() && s.source.is_none(),
                    sensitive: s.sensitive,
                    managed_by: s.source.map(|s| s.as_str().to_string()),
                    validation: s
                        .validation
                        .as_ref()
                        .and_then(|v| serde_json::to_value(v).ok()),
                })
                .collect(),
        }
    }

    /// Checks user-supplied variables against the manifest: unknown names, managed
    /// variables, types, validation rules and required variables without a default.
    pub fn validate_vars(&self, vars: &BTreeMap<String, Value>) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |name: &str, message: String| {
            errors.push(FieldError {
                field: format!("vars.{name}"),
                message,
            })
        };
        for (name, value) in vars {
            let Some(spec) = self.manifest.variables.get(name) else {
                err(
                    name,
                    format!("template {:?} has no variable {name:?}", self.name),
                );
                continue;
            };
            if spec.source.is_some() {
                err(
                    name,
                    "is managed by cellplane and cannot be set".to_string(),
                );
                continue;
            }
            if !type_matches(spec.type_, value) {
                err(name, format!("must be a {}", spec.type_.as_str()));
                continue;
            }
            if let Some(rule) = &spec.validation {
                if let Some(msg) = self.check_rule(name, rule, value) {
                    err(name, msg);
                }
            }
        }
        for (name, spec) in &self.manifest.variables {
            if spec.default.is_none() && spec.source.is_none() && !vars.contains_key(name) {
                err(name, "is required".to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn check_rule(&self, name: &str, rule: &Validation, value: &Value) -> Option<String> {
        if let Some(allowed) = &rule.allowed {
            if !allowed.contains(value) {
                let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
                return Some(format!("must be one of {}", list.join(", ")));
            }
        }
        if let Some(n) = value.as_f64() {
            if rule.min.is_some_and(|m| n < m) || rule.max.is_some_and(|m| n > m) {
                return Some(format!(
                    "must be between {} and {}",
                    rule.min.map(|m| m.to_string()).unwrap_or("-inf".into()),
                    rule.max.map(|m| m.to_string()).unwrap_or("+inf".into())
                ));
            }
        }
        let strings: Vec<&str> = match value {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            Value::Object(m) => m.values().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        for s in strings {
            if rule.max_length.is_some_and(|m| s.chars().count() > m) {
                return Some(format!(
                    "must be at most {} characters",
                    rule.max_length.unwrap_or_default()
                ));
            }
            if let Some(re) = self.patterns.get(name) {
                if !re.is_match(s) {
                    return Some(format!(
                        "must match {}",
                        rule.pattern.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
        None
    }

    /// The app version a cell runs: its own, else the template's default.
    pub fn app_version(&self, cell: &Cell) -> String {
        cell.app_version
            .clone()
            .or_else(|| self.manifest.default_app_version.clone())
            .unwrap_or_else(|| "0.0.0".into())
    }

    /// The value of every template variable for `input.cell`: the user's, else the
    /// control plane's (for sourced variables), else the default.
    fn resolve(&self, input: &RenderInput<'_>) -> Result<BTreeMap<String, Value>, TemplateError> {
        let mut out = BTreeMap::new();
        let missing = |name: &str, what: &str| TemplateError::Render {
            name: self.name.clone(),
            message: format!("variable {name}: {what}"),
        };
        for (name, spec) in &self.manifest.variables {
            let v = match spec.source {
                Some(VarSource::Port) => input
                    .cell
                    .vars
                    .get(name)
                    .cloned()
                    .ok_or_else(|| missing(name, "no port was allocated for the cell"))?,
                Some(VarSource::Secret) => input
                    .secrets
                    .get(name)
                    .cloned()
                    .ok_or_else(|| missing(name, "no secret was generated for the cell"))?,
                Some(VarSource::CellDir) => {
                    Value::String(input.system.cell_dir.display().to_string())
                }
                Some(VarSource::SampleCellBin) => Value::String(
                    input
                        .system
                        .sample_cell_bin
                        .as_ref()
                        .ok_or_else(|| {
                            missing(
                                name,
                                "the sample-cell binary was not found next to cellplane, on \
                                 PATH, or in iac.sample_cell_bin",
                            )
                        })?
                        .display()
                        .to_string(),
                ),
                None => match input.cell.vars.get(name).or(spec.default.as_ref()) {
                    Some(v) => v.clone(),
                    None => return Err(missing(name, "is required and has no value")),
                },
            };
            out.insert(name.clone(), v);
        }
        Ok(out)
    }

    /// Renders the stack for a cell. Deterministic: the same input gives the same bytes.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<RenderedStack, TemplateError> {
        let cell = input.cell;
        let vars = self.resolve(input)?;
        let mapping = cell_resource_mapping(&cell.cell_id, cell.tier);
        let app_version = self.app_version(cell);

        // The tfvars: builtins, then the template's variables.
        let mut tfvars: BTreeMap<String, Value> = BTreeMap::new();
        tfvars.insert("cell_id".into(), json!(cell.cell_id));
        tfvars.insert("region".into(), json!(cell.region));
        tfvars.insert("tier".into(), json!(cell.tier.as_str()));
        tfvars.insert("app_version".into(), json!(app_version));
        tfvars.insert("labels".into(), json!(cell.labels));
        tfvars.insert(
            "capacity".into(),
            json!({"tenants": cell.capacity.tenants, "units": cell.capacity.units}),
        );
        tfvars.insert("resource_mapping".into(), json!(mapping));
        for (k, v) in &vars {
            tfvars.insert(k.clone(), v.clone());
        }

        // The render context never holds sensitive values.
        let visible: BTreeMap<&String, &Value> = vars
            .iter()
            .filter(|(k, _)| !self.manifest.variables[*k].sensitive)
            .collect();
        let ctx_value = json!({
            "cell": {
                "id": cell.cell_id,
                "region": cell.region,
                "tier": cell.tier.as_str(),
                "capacity": {"tenants": cell.capacity.tenants, "units": cell.capacity.units},
                "labels": cell.labels,
                "app_version": app_version,
            },
            "mapping": mapping,
            "vars": visible,
            "template": self.name,
        });
        let context = tera::Context::from_value(ctx_value).map_err(|e| self.render_err(e))?;
        let mut tera = tera::Tera::default();
        tera.autoescape_on(vec![".tera"]);
        tera.set_escape_fn(hcl_escape);
        tera.register_filter("hcl", HclFilter);
        for (file, src) in &self.sources {
            tera.add_raw_template(file, src)
                .map_err(|e| self.render_err(e))?;
        }

        let mut files = BTreeMap::new();
        for file in self.sources.keys() {
            let out = tera
                .render(file, &context)
                .map_err(|e| self.render_err(e))?;
            let name = file.trim_end_matches(".tera").to_string();
            files.insert(name, out.into_bytes());
        }
        files.insert(VARIABLES_FILE.to_string(), self.variables_tf().into_bytes());
        if input.pg_backend {
            files.insert(
                BACKEND_FILE.to_string(),
                b"# State lives in PostgreSQL; cellplane passes the connection and schema\n\
                  # through PG_CONN_STR and PG_SCHEMA_NAME.\n\
                  terraform {\n  backend \"pg\" {}\n}\n"
                    .to_vec(),
            );
        }
        for (name, content) in &self.statics {
            files.insert(name.clone(), content.clone());
        }
        let mut tfvars_text =
            serde_json::to_string_pretty(&tfvars).expect("JSON values always serialize");
        tfvars_text.push('\n');
        files.insert(TFVARS_FILE.to_string(), tfvars_text.into_bytes());

        for (name, content) in &files {
            if name.ends_with(".tf") {
                let text = String::from_utf8_lossy(content);
                reparse(name, &text)?;
            }
        }
        let secrets = self
            .manifest
            .variables
            .iter()
            .filter(|(_, s)| s.sensitive)
            .filter_map(|(k, _)| vars.get(k).and_then(Value::as_str))
            .filter(|s| s.len() >= 4)
            .map(str::to_string)
            .collect();
        Ok(RenderedStack { files, secrets })
    }

    fn render_err(&self, e: tera::Error) -> TemplateError {
        // Tera nests the useful message in the error's sources.
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        TemplateError::Render {
            name: self.name.clone(),
            message,
        }
    }

    /// `variable` blocks for the builtins and every template variable.
    fn variables_tf(&self) -> String {
        let mut out = String::from(
            "# Generated by cellplane from template.toml; values are in cellplane.auto.tfvars.json.\n",
        );
        for (name, ty) in BUILTIN_VARIABLES {
            out.push_str(&format!("\nvariable \"{name}\" {{\n  type = {ty}\n}}\n"));
        }
        for (name, spec) in &self.manifest.variables {
            out.push_str(&format!(
                "\nvariable \"{name}\" {{\n  type        = {}\n  description = \"{}\"\n",
                spec.type_.hcl_type(),
                hcl_escape(&spec.description)
            ));
            if spec.sensitive {
                out.push_str("  sensitive   = true\n");
            }
            out.push_str("}\n");
        }
        out
    }
}

/// Top-level blocks a stack may contain.
const ALLOWED_BLOCKS: &[&str] = &[
    "terraform",
    "variable",
    "locals",
    "resource",
    "data",
    "output",
    "provider",
    "module",
    "moved",
    "import",
    "removed",
    "check",
];

/// Parses a rendered file with hcl-rs: it must be valid HCL with only known top-level
/// blocks and no top-level attributes.
pub fn reparse(file: &str, text: &str) -> Result<(), TemplateError> {
    let err = |message: String| TemplateError::Reparse {
        file: file.to_string(),
        message,
    };
    let body = hcl::parse(text).map_err(|e| err(e.to_string()))?;
    if let Some(a) = body.attributes().next() {
        return Err(err(format!("unexpected top-level attribute {}", a.key())));
    }
    for b in body.blocks() {
        let id = b.identifier();
        if !ALLOWED_BLOCKS.contains(&id) {
            return Err(err(format!("unexpected top-level block {id:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_values_inert() {
        assert_eq!(hcl_escape(r#"a"b"#), r#"a\"b"#);
        assert_eq!(
            hcl_escape("${file(\"/etc/passwd\")}"),
            r#"$${file(\"/etc/passwd\")}"#
        );
        assert_eq!(hcl_escape("%{ if x }"), "%%{ if x }");
        assert_eq!(hcl_escape("x\ny\\"), "x\\ny\\\\");
        assert_eq!(hcl_escape("$x %y"), "$x %y");
        assert_eq!(hcl_escape("\u{7}"), "\\u0007");
        // An escaped value inside quotes parses as one string attribute, whatever it holds.
        for evil in [
            "x\"\nresource \"terraform_data\" \"p\" {}",
            "${file(\"/etc/passwd\")}",
            "../../etc",
            "\\\"",
            "%{for x in y}${x}%{endfor}",
        ] {
            let src = format!("locals {{\n  v = \"{}\"\n}}\n", hcl_escape(evil));
            let body = hcl::parse(&src).expect("parses");
            assert_eq!(body.blocks().count(), 1, "{src}");
        }
    }

    #[test]
    fn literal_of_nested_values() {
        let v = json!({"a": [1, "b\"", true], "k": null});
        assert_eq!(hcl_literal(&v), r#"{ "a" = [1, "b\"", true], "k" = null }"#);
    }

    fn templates() -> Catalog {
        Catalog::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cell-templates"))
    }

    fn fixed_cell(template: &str, tier: Tier, vars: Value) -> Cell {
        Cell {
            cell_id: "snap-1".into(),
            region: "eu-west-1".into(),
            tier,
            template: template.into(),
            capacity: cellplane_api::Capacity {
                tenants: 50,
                units: 100,
            },
            used: Default::default(),
            labels: [("canary".to_string(), "true".to_string())].into(),
            vars: serde_json::from_value(vars).expect("vars"),
            state: cellplane_api::CellState::Pending,
            outputs: Default::default(),
            app_version: Some("2.3.4".into()),
            drift: None,
            pending_job_id: None,
            version: 1,
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            updated_at: "2026-01-01T00:00:00.000000Z".into(),
        }
    }

    fn render_fixed(template: &str, tier: Tier, vars: Value, pg: bool) -> RenderedStack {
        let t = templates().load(template).expect("template loads");
        let cell = fixed_cell(template, tier, vars);
        let secrets: BTreeMap<String, Value> =
            [("admin_token".to_string(), json!("snapshot-secret-token"))].into();
        t.render(&RenderInput {
            cell: &cell,
            secrets: &secrets,
            system: SystemValues {
                cell_dir: PathBuf::from("/var/lib/cellplane/cells/snap-1/run"),
                sample_cell_bin: Some(PathBuf::from("/usr/local/bin/sample-cell")),
            },
            pg_backend: pg,
        })
        .expect("renders")
    }

    /// Compares a rendered stack with `src/iac/snapshots/<name>/`; `UPDATE_SNAPSHOTS=1`
    /// rewrites the snapshots.
    fn check_snapshot(name: &str, stack: &RenderedStack) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/iac/snapshots")
            .join(name);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("snapshot dir");
            for (f, content) in &stack.files {
                std::fs::write(dir.join(f), content).expect("write snapshot");
            }
            return;
        }
        let mut expected: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_SNAPSHOTS=1)", dir.display()))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        expected.sort();
        let got: Vec<String> = stack.files.keys().cloned().collect();
        assert_eq!(got, expected, "files of {name}");
        for (f, content) in &stack.files {
            let want = std::fs::read(dir.join(f)).expect("snapshot file");
            assert!(
                want == *content,
                "{name}/{f} differs from its snapshot (UPDATE_SNAPSHOTS=1 to accept):\n{}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn rendering_is_deterministic_and_matches_snapshots() {
        let local = render_fixed("local", Tier::Pooled, json!({"port": 18080}), false);
        assert_eq!(
            local,
            render_fixed("local", Tier::Pooled, json!({"port": 18080}), false)
        );
        check_snapshot("local-pooled", &local);
        let aws = render_fixed(
            "aws",
            Tier::Dedicated,
            json!({"aws_endpoint": "http://127.0.0.1:5000"}),
            true,
        );
        assert_eq!(
            aws,
            render_fixed(
                "aws",
                Tier::Dedicated,
                json!({"aws_endpoint": "http://127.0.0.1:5000"}),
                true
            )
        );
        check_snapshot("aws-dedicated", &aws);
        // Secrets reach the tfvars only, and are listed for redaction.
        assert!(local.secrets.contains(&"snapshot-secret-token".to_string()));
        let main = String::from_utf8_lossy(&local.files["main.tf"]);
        assert!(!main.contains("snapshot-secret-token"));
    }

    #[test]
    fn pooled_and_dedicated_differ_by_variables_only() {
        let pooled = render_fixed("aws", Tier::Pooled, json!({}), false);
        let dedicated = render_fixed("aws", Tier::Dedicated, json!({}), false);
        let tfvars = |s: &RenderedStack| -> Value {
            serde_json::from_slice(&s.files[TFVARS_FILE]).expect("tfvars json")
        };
        assert_eq!(
            tfvars(&pooled)["resource_mapping"]["bucket"],
            "cells-snap-1"
        );
        assert_eq!(
            tfvars(&dedicated)["resource_mapping"]["bucket"],
            "data-snap-1"
        );
        // The HCL differs only in the header comment naming the tier.
        let strip = |s: &RenderedStack| -> String {
            String::from_utf8_lossy(&s.files["main.tf"])
                .lines()
                .filter(|l| !l.starts_with("# Rendered by cellplane"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&pooled), strip(&dedicated));
    }

    #[test]
    fn variables_are_checked_against_the_manifest() {
        let t = templates().load("local").expect("local");
        assert!(t.validate_vars(&BTreeMap::new()).is_ok());
        let fields = |v: Value| -> Vec<String> {
            let vars: BTreeMap<String, Value> = serde_json::from_value(v).expect("map");
            t.validate_vars(&vars)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(fields(json!({"nope": 1})), ["vars.nope"]);
        assert_eq!(fields(json!({"port": 1})), ["vars.port"]);
        assert_eq!(fields(json!({"fault_rate": "x"})), ["vars.fault_rate"]);
        assert_eq!(fields(json!({"fault_rate": 1.5})), ["vars.fault_rate"]);
        assert_eq!(
            fields(json!({"instance_class": "huge"})),
            ["vars.instance_class"]
        );
        assert!(fields(json!({"fault_rate": 0.5, "instance_class": "large"})).is_empty());
        let aws = templates().load("aws").expect("aws");
        let vars: BTreeMap<String, Value> =
            serde_json::from_value(json!({"vpc_cidr": "10.0.0.0/16\"}"})).expect("map");
        assert!(aws.validate_vars(&vars).is_err());
        let vars: BTreeMap<String, Value> =
            serde_json::from_value(json!({"allowed_cidrs": ["10.0.0.0/8", "${x}"]})).expect("map");
        assert!(aws.validate_vars(&vars).is_err());
        // Unknown templates and names that are not identifiers are unknown.
        assert!(matches!(
            templates().load("nope"),
            Err(TemplateError::Unknown(_))
        ));
        assert!(matches!(
            templates().load("../local"),
            Err(TemplateError::Unknown(_))
        ));
    }

    #[test]
    fn reparse_rejects_unknown_blocks_and_attributes() {
        assert!(reparse("x.tf", "resource \"a\" \"b\" {}\n").is_ok());
        assert!(reparse("x.tf", "oops \"a\" {}\n").is_err());
        assert!(reparse("x.tf", "a = 1\n").is_err());
        assert!(reparse("x.tf", "resource \"a\" {\n").is_err());
    }
}

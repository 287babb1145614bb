//! Reads AgentTool and ToolPolicy manifests from multi-document YAML files
//! and folders, with errors that name the file, document, line and field.
//!
//! Each document is checked three ways before it is accepted: YAML syntax,
//! the Rust types (unknown fields and wrong types, with their path), and the
//! bounds of the generated CRD schema, so `check` rejects offline exactly what
//! the API server would.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::names::dns1123_subdomain;
use super::{API_VERSION, AgentTool, ToolPolicy};

/// Largest manifest file read; GitOps repositories hold nothing near this.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Most documents read from one file.
pub const MAX_DOCUMENTS_PER_FILE: usize = 10_000;

/// Where an object came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.document)
    }
}

/// An object read from a manifest.
#[derive(Clone, Debug)]
pub struct Loaded<T> {
    pub origin: Origin,
    pub object: T,
}

/// Everything read from a set of paths.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub tools: Vec<Loaded<AgentTool>>,
    pub policies: Vec<Loaded<ToolPolicy>>,
    /// Documents of other kinds, which `check` skips and counts.
    pub skipped: Vec<(Origin, String)>,
}

/// Why a file or document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {message}", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error("{origin}: YAML error at line {line}, column {column}: {message}")]
    Yaml {
        origin: Origin,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {path}: {message}")]
    Invalid {
        origin: Origin,
        path: String,
        message: String,
    },
}

impl Manifests {
    /// Reads every path: files, or folders searched for `*.yaml`/`*.yml`
    /// (subfolders too when `recursive`, as `kubectl -R`). All errors are
    /// collected so one run reports every broken document.
    pub fn load(paths: &[PathBuf], recursive: bool) -> Result<Manifests, Vec<LoadError>> {
        let mut manifests = Manifests::default();
        let mut errors = Vec::new();
        for file in expand_paths(paths, recursive, &mut errors) {
            match read_file(&file) {
                Ok(text) => manifests.add_text(&file, &text, &mut errors),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(manifests)
        } else {
            Err(errors)
        }
    }

    /// Parses one file's text; errors go to `errors`, good documents are kept.
    pub fn add_text(&mut self, file: &Path, text: &str, errors: &mut Vec<LoadError>) {
        let documents = split_documents(text);
        if documents.len() > MAX_DOCUMENTS_PER_FILE {
            errors.push(LoadError::Unreadable {
                path: file.to_path_buf(),
                message: format!(
                    "{} documents; at most {MAX_DOCUMENTS_PER_FILE} are read from one file",
                    documents.len()
                ),
            });
            return;
        }
        for (index, (line, body)) in documents.into_iter().enumerate() {
            let origin = Origin {
                file: file.to_path_buf(),
                document: index + 1,
                line,
            };
            if let Err(e) = self.add_document(origin, body) {
                errors.push(e);
            }
        }
    }

    fn add_document(&mut self, origin: Origin, body: &str) -> Result<(), LoadError> {
        let value: serde_yaml::Value = serde_yaml::from_str(body).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            LoadError::Yaml {
                origin: origin.clone(),
                line: origin.line + line - 1,
                column,
                message: without_location(&e),
            }
        })?;
        if value.is_null() {
            return Ok(());
        }
        let invalid = |path: &str, message: String| LoadError::Invalid {
            origin: origin.clone(),
            path: path.into(),
            message,
        };
        let Some(map) = value.as_mapping() else {
            return Err(invalid(
                "(document)",
                "a manifest must be a mapping with apiVersion and kind".into(),
            ));
        };
        let field = |name: &str| {
            map.get(name)
                .and_then(serde_yaml::Value::as_str)
                .map(str::to_string)
        };
        let kind =
            field("kind").ok_or_else(|| invalid("kind", "missing or not a string".into()))?;
        let api_version = field("apiVersion")
            .ok_or_else(|| invalid("apiVersion", "missing or not a string".into()))?;
        if !api_version.starts_with("toolwarden.dev/")
            || !matches!(kind.as_str(), "AgentTool" | "ToolPolicy")
        {
            self.skipped.push((origin, format!("{api_version}/{kind}")));
            return Ok(());
        }
        if api_version != API_VERSION {
            return Err(invalid(
                "apiVersion",
                format!("`{api_version}` is not served; use {API_VERSION}"),
            ));
        }
        for key in map.keys() {
            let known = key.as_str().is_some_and(|k| {
                matches!(k, "apiVersion" | "kind" | "metadata" | "spec" | "status")
            });
            if !known {
                return Err(invalid(
                    &yaml_key(key),
                    "unknown field (expected apiVersion, kind, metadata, spec or status)".into(),
                ));
            }
        }
        // The API server takes only DNS-1123 subdomains as names; offline, nothing else
        // would stop a name like `../x` from reaching URLs, logs and file names.
        if let Some(name) = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(serde_yaml::Value::as_str)
            && let Err(e) = dns1123_subdomain(name)
        {
            return Err(invalid("metadata.name", e.to_string()));
        }
        match kind.as_str() {
            "AgentTool" => {
                let object = typed(&value, &AGENT_TOOL_SCHEMA)
                    .map_err(|(path, message)| invalid(&path, message))?;
                self.tools.push(Loaded { origin, object });
            }
            _ => {
                let object = typed(&value, &TOOL_POLICY_SCHEMA)
                    .map_err(|(path, message)| invalid(&path, message))?;
                self.policies.push(Loaded { origin, object });
            }
        }
        Ok(())
    }
}

fn yaml_key(key: &serde_yaml::Value) -> String {
    serde_yaml::to_string(key)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(key)".into())
}

/// serde_yaml writes document-relative "at line X column Y" into messages;
/// we print our own file-relative location instead.
fn without_location(e: &serde_yaml::Error) -> String {
    static LOCATION: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r" at line \d+ column \d+").expect("static pattern"));
    LOCATION.replace_all(&e.to_string(), "").into_owned()
}

/// Deserializes into the Rust type (exact field paths on error), then checks
/// the CRD schema's bounds.
fn typed<T: DeserializeOwned>(
    value: &serde_yaml::Value,
    schema: &jsonschema::Validator,
) -> Result<T, (String, String)> {
    let object: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        (
            if path == "." {
                "(document)".into()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })?;
    let json: Value =
        serde_json::to_value(value).map_err(|e| ("(document)".to_string(), e.to_string()))?;
    if let Some(error) = schema.iter_errors(&json).next() {
        let path = pointer_to_path(&error.instance_path().to_string());
        return Err((path, error.to_string()));
    }
    Ok(object)
}

/// `/spec/secrets/0/env` → `spec.secrets[0].env`.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    if path.is_empty() {
        "(document)".into()
    } else {
        path
    }
}

static AGENT_TOOL_SCHEMA: LazyLock<jsonschema::Validator> =
    LazyLock::new(|| crd_validator(AgentTool::crd()));
static TOOL_POLICY_SCHEMA: LazyLock<jsonschema::Validator> =
    LazyLock::new(|| crd_validator(ToolPolicy::crd()));

/// Compiles a CRD's OpenAPI v3 schema as JSON Schema. The two dialects differ
/// in `nullable`, which becomes an explicit `null` type.
fn crd_validator(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> jsonschema::Validator {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("generated CRDs carry a schema");
    let mut schema = serde_json::to_value(schema).expect("schema serializes");
    openapi_nullable_to_json_schema(&mut schema);
    jsonschema::draft4::new(&schema).expect("generated CRD schema compiles")
}

fn openapi_nullable_to_json_schema(schema: &mut Value) {
    match schema {
        Value::Object(obj) => {
            if obj.remove("nullable") == Some(Value::Bool(true)) {
                match obj.get("type").cloned() {
                    Some(Value::String(t)) => {
                        obj.insert("type".into(), serde_json::json!([t, "null"]));
                    }
                    _ => {
                        // int-or-string quantities: anyOf gains a null branch.
                        if let Some(Value::Array(any_of)) = obj.get_mut("anyOf") {
                            any_of.push(serde_json::json!({"type": "null"}));
                        }
                    }
                }
            }
            obj.values_mut().for_each(openapi_nullable_to_json_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(openapi_nullable_to_json_schema),
        _ => {}
    }
}

/// Splits a YAML stream at `---` lines, returning each document with the
/// 1-based line it starts on, so errors can point at the file's own lines.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let mut start_offset = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            documents.push((start_line, &text[start_offset..offset]));
            start_offset = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start_offset..]));
    documents.retain(|(_, body)| !body.trim().is_empty());
    documents
}

fn read_file(path: &Path) -> Result<String, LoadError> {
    let unreadable = |message: String| LoadError::Unreadable {
        path: path.to_path_buf(),
        message,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| unreadable(e.to_string()))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(unreadable(format!(
            "{size} bytes; manifests larger than {MAX_FILE_BYTES} bytes are not read"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    String::from_utf8(bytes)
        .map_err(|e| unreadable(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))
}

/// Files named directly, plus `*.yaml`/`*.yml` found below folders, sorted.
fn expand_paths(paths: &[PathBuf], recursive: bool, errors: &mut Vec<LoadError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            collect_yaml(path, recursive, &mut files, errors);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            errors.push(LoadError::Unreadable {
                path: path.clone(),
                message: "no such file or directory".into(),
            });
        }
    }
    files
}

fn collect_yaml(
    dir: &Path,
    recursive: bool,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<LoadError>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return errors.push(LoadError::Unreadable {
                path: dir.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            if recursive {
                collect_yaml(&path, recursive, files, errors);
            }
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_their_start_lines() {
        let docs = split_documents("a: 1\n---\nb: 2\nc: 3\n--- \n---\nd: 4");
        assert_eq!(docs, vec![(1, "a: 1\n"), (3, "b: 2\nc: 3\n"), (7, "d: 4")]);
    }

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(
            pointer_to_path("/spec/secrets/0/env"),
            "spec.secrets[0].env"
        );
        assert_eq!(pointer_to_path(""), "(document)");
    }
}

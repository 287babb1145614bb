//! `crds/` must be exactly what the Rust types generate, and the generated
//! schemas must stay structural (what a real API server accepts).

use std::path::Path;

use serde_json::Value;

#[test]
fn crds_folder_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let files = toolwarden::api::crd_files();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = files.iter().map(|(name, _)| name.clone()).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "crds/ holds other files than the generated CRDs"
    );
    for (name, yaml) in files {
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert!(
            committed == yaml,
            "crds/{name} drifted from src/api; regenerate with `cargo run -- crd --write crds`"
        );
    }
}

fn walk<'a>(value: &'a Value, path: String, visit: &mut dyn FnMut(&str, &'a Value)) {
    visit(&path, value);
    match value {
        Value::Object(map) => map
            .iter()
            .for_each(|(k, v)| walk(v, format!("{path}.{k}"), visit)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| walk(v, format!("{path}[{i}]"), visit)),
        _ => {}
    }
}

fn schemas() -> Vec<(String, Value)> {
    toolwarden::api::all_crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap();
            let schema = crd.spec.versions[0]
                .schema
                .clone()
                .unwrap()
                .open_api_v3_schema
                .unwrap();
            (name, serde_json::to_value(schema).unwrap())
        })
        .collect()
}

/// k8s.io/apiextensions-apiserver's supported formats (pkg/apiserver/validation/formats.go).
const KUBERNETES_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

#[test]
fn schemas_are_structural() {
    for (name, schema) in schemas() {
        walk(&schema, name.clone(), &mut |path, node| {
            let Some(obj) = node.as_object() else { return };
            assert!(
                !obj.contains_key("$ref"),
                "{path}: $ref is not allowed in a structural schema"
            );
            for forbidden in ["oneOf", "allOf", "not", "additionalItems"] {
                assert!(
                    !obj.contains_key(forbidden),
                    "{path}: {forbidden} breaks structural schemas here"
                );
            }
            // Every node that is not an int-or-string or free-form node declares its type.
            let free = obj.contains_key("x-kubernetes-int-or-string")
                || obj.contains_key("x-kubernetes-preserve-unknown-fields");
            let is_schema_node = obj.contains_key("properties")
                || obj.contains_key("items")
                || obj.contains_key("description");
            if is_schema_node && !free && !path.ends_with(".properties") {
                assert!(obj.contains_key("type"), "{path}: missing type");
            }
            // The formats the API server knows; any other earns every `kubectl apply` a
            // "unrecognized format" warning.
            if let Some(format) = obj.get("format").and_then(Value::as_str) {
                assert!(
                    KUBERNETES_FORMATS.contains(&format),
                    "{path}: format {format:?} is unknown to Kubernetes"
                );
            }
            if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
                panic!("{path}: properties and additionalProperties are mutually exclusive");
            }
        });
    }
}

#[test]
fn free_form_and_quantity_fields_use_the_kubernetes_extensions() {
    let schemas = schemas();
    let (_, tool) = schemas
        .iter()
        .find(|(n, _)| n == "agenttools.toolwarden.dev")
        .unwrap();
    let spec = &tool["properties"]["spec"]["properties"];
    assert_eq!(
        spec["inputSchema"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    for quantity in ["memory", "cpu", "tmpSize"] {
        assert_eq!(
            spec["sandbox"]["properties"][quantity]["x-kubernetes-int-or-string"], true,
            "{quantity}"
        );
    }
    let secret_rules = spec["secrets"]["items"]["x-kubernetes-validations"].to_string();
    assert!(
        secret_rules.contains("exactly one way"),
        "secret delivery CEL rule missing: {secret_rules}"
    );
    let spec_rules = tool["properties"]["spec"]["x-kubernetes-validations"].to_string();
    assert!(
        spec_rules.contains("approval.required"),
        "approval CEL rule missing: {spec_rules}"
    );
}

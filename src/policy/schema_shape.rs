//! Walks a tool's input schema once and records the shape facts the input
//! validation and sanitization rules need: open objects, unbounded strings
//! and arrays, free-text strings, and where each string lands in the input.

use std::collections::HashSet;

use serde_json::{Map, Value};

/// Deepest schema nesting the walk follows (and the baseline allows).
pub const MAX_SCHEMA_DEPTH: usize = 32;

/// One place in the input schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaSite {
    /// Path of the subschema in the manifest, e.g. `spec.inputSchema.properties.bio`.
    pub schema_path: String,
    /// JSON pointer of the value it validates in the input, `*` for any index or key.
    pub data_path: String,
}

/// What the walk found.
#[derive(Clone, Debug, Default)]
pub struct SchemaShape {
    pub open_objects: Vec<SchemaSite>,
    pub unbounded_strings: Vec<SchemaSite>,
    pub unbounded_arrays: Vec<SchemaSite>,
    /// Strings with no enum, const, format or pattern: anything a person can type.
    pub free_text: Vec<SchemaSite>,
    /// Data paths of every string-typed field.
    pub string_fields: HashSet<String>,
    /// Set when the schema nests deeper than [`MAX_SCHEMA_DEPTH`].
    pub too_deep: Option<SchemaSite>,
}

/// Deepest raw JSON nesting of an input schema: two JSON levels per schema
/// level (`properties` → name → subschema) plus slack for keywords.
const MAX_JSON_DEPTH: usize = 2 * MAX_SCHEMA_DEPTH + 8;

/// Walks `schema` (the tool's `inputSchema`), resolving local `#/$defs/...` references.
pub fn analyze(schema: &Value) -> SchemaShape {
    if exceeds_depth(schema, MAX_JSON_DEPTH) {
        // Not walked (nor compiled, see facts.rs): deep input must not reach recursive code.
        let site = SchemaSite {
            schema_path: "spec.inputSchema".into(),
            data_path: String::new(),
        };
        return SchemaShape {
            too_deep: Some(site),
            ..SchemaShape::default()
        };
    }
    let mut walk = Walk {
        root: schema,
        shape: SchemaShape::default(),
        ref_stack: Vec::new(),
    };
    walk.visit(schema, "spec.inputSchema".to_string(), String::new(), 0);
    walk.shape
}

struct Walk<'a> {
    root: &'a Value,
    shape: SchemaShape,
    /// References being expanded, to stop at recursive schemas.
    ref_stack: Vec<&'a str>,
}

impl<'a> Walk<'a> {
    fn visit(&mut self, schema: &'a Value, schema_path: String, data_path: String, depth: usize) {
        let site = || SchemaSite {
            schema_path: schema_path.clone(),
            data_path: data_path.clone(),
        };
        if depth > MAX_SCHEMA_DEPTH {
            if self.shape.too_deep.is_none() {
                self.shape.too_deep = Some(site());
            }
            return;
        }
        let Some(obj) = schema.as_object() else {
            // `true` accepts anything; `false` accepts nothing and needs no bound.
            if schema == &Value::Bool(true) {
                self.shape.unbounded_strings.push(site());
                self.shape.open_objects.push(site());
            }
            return;
        };
        if let Some(target) = obj.get("$ref").and_then(Value::as_str) {
            self.follow_ref(target, &schema_path, &data_path, depth);
        }
        for keyword in ["allOf", "anyOf", "oneOf"] {
            for (i, sub) in obj
                .get(keyword)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                self.visit(
                    sub,
                    format!("{schema_path}.{keyword}[{i}]"),
                    data_path.clone(),
                    depth + 1,
                );
            }
        }
        let pinned = obj.contains_key("enum") || obj.contains_key("const");
        let types = declared_types(obj);
        let untyped = types.is_empty() && !pinned && !has_structure(obj);
        if untyped {
            // No type and no structure: any JSON value passes.
            self.shape.unbounded_strings.push(site());
            self.shape.open_objects.push(site());
            return;
        }
        if types.contains(&"string") {
            self.shape.string_fields.insert(data_path.clone());
            let shaped = pinned || obj.contains_key("format") || obj.contains_key("pattern");
            if !shaped {
                self.shape.free_text.push(site());
            }
            if !shaped && !obj.contains_key("maxLength") {
                self.shape.unbounded_strings.push(site());
            }
        }
        if types.contains(&"object") || obj.contains_key("properties") {
            self.visit_object(obj, &schema_path, &data_path, depth);
        }
        if types.contains(&"array") || obj.contains_key("items") || obj.contains_key("prefixItems")
        {
            if !obj.contains_key("maxItems") && !pinned {
                self.shape.unbounded_arrays.push(site());
            }
            for (i, sub) in obj
                .get("prefixItems")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                self.visit(
                    sub,
                    format!("{schema_path}.prefixItems[{i}]"),
                    format!("{data_path}/{i}"),
                    depth + 1,
                );
            }
            if let Some(items) = obj.get("items") {
                self.visit(
                    items,
                    format!("{schema_path}.items"),
                    format!("{data_path}/*"),
                    depth + 1,
                );
            }
        }
    }

    fn visit_object(
        &mut self,
        obj: &'a Map<String, Value>,
        schema_path: &str,
        data_path: &str,
        depth: usize,
    ) {
        let closed_by = |key: &str| obj.get(key) == Some(&Value::Bool(false));
        match obj.get("additionalProperties") {
            _ if closed_by("additionalProperties") || closed_by("unevaluatedProperties") => {}
            // A map with a value schema and a key count bound is bounded too.
            Some(values @ Value::Object(_)) if obj.contains_key("maxProperties") => {
                self.visit(
                    values,
                    format!("{schema_path}.additionalProperties"),
                    format!("{data_path}/*"),
                    depth + 1,
                );
            }
            _ => self.shape.open_objects.push(SchemaSite {
                schema_path: schema_path.to_string(),
                data_path: data_path.to_string(),
            }),
        }
        if let Some(properties) = obj.get("properties").and_then(Value::as_object) {
            for (name, sub) in properties {
                let pointer_name = name.replace('~', "~0").replace('/', "~1");
                self.visit(
                    sub,
                    format!("{schema_path}.properties.{name}"),
                    format!("{data_path}/{pointer_name}"),
                    depth + 1,
                );
            }
        }
    }

    fn follow_ref(&mut self, target: &'a str, schema_path: &str, data_path: &str, depth: usize) {
        if self.ref_stack.contains(&target) {
            return;
        }
        // Only local references can exist: the compile rule rejects remote ones.
        let Some(resolved) = target
            .strip_prefix('#')
            .and_then(|pointer| self.root.pointer(pointer))
        else {
            return;
        };
        self.ref_stack.push(target);
        self.visit(
            resolved,
            format!("{schema_path}.$ref({target})"),
            data_path.to_string(),
            depth + 1,
        );
        self.ref_stack.pop();
    }
}

/// True when `value` nests deeper than `limit`; iterative, so no depth can overflow the stack.
pub fn exceeds_depth(value: &Value, limit: usize) -> bool {
    let mut stack = vec![(value, 0usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth > limit {
            return true;
        }
        match node {
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    false
}

fn declared_types(obj: &Map<String, Value>) -> Vec<&str> {
    match obj.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Keywords that give an untyped schema a shape of its own.
fn has_structure(obj: &Map<String, Value>) -> bool {
    [
        "$ref",
        "allOf",
        "anyOf",
        "oneOf",
        "properties",
        "items",
        "prefixItems",
        "not",
    ]
    .iter()
    .any(|k| obj.contains_key(*k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_schema_has_no_findings_and_records_string_paths() {
        let shape = analyze(&json!({
            "type": "object", "additionalProperties": false,
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "enum": ["a", "b"]}},
                "bio": {"type": "string", "maxLength": 10}
            }
        }));
        assert!(
            shape.open_objects.is_empty()
                && shape.unbounded_strings.is_empty()
                && shape.unbounded_arrays.is_empty()
        );
        assert_eq!(
            shape
                .free_text
                .iter()
                .map(|s| s.data_path.as_str())
                .collect::<Vec<_>>(),
            ["/bio"]
        );
        assert!(shape.string_fields.contains("/tags/*"));
    }

    #[test]
    fn finds_open_objects_unbounded_strings_and_arrays_through_refs() {
        let shape = analyze(&json!({
            "type": "object",
            "properties": {"list": {"type": "array", "items": {"$ref": "#/$defs/item"}}},
            "$defs": {"item": {"type": "string"}}
        }));
        assert_eq!(shape.open_objects[0].schema_path, "spec.inputSchema");
        assert_eq!(shape.unbounded_arrays[0].data_path, "/list");
        assert_eq!(shape.unbounded_strings[0].data_path, "/list/*");
    }

    #[test]
    fn recursive_refs_terminate() {
        let shape = analyze(&json!({"$ref": "#", "type": "object", "additionalProperties": false}));
        assert!(shape.too_deep.is_none());
    }
}

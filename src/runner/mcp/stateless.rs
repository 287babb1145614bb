//! The stateless era (revision 2026-07-28): every request carries its protocol
//! version and client capabilities in `params._meta`, and mirrors its method and
//! tool name into `Mcp-Method`/`Mcp-Name` headers. A request is checked here, in
//! the order the specification's server validation gives, before it is served.

use axum::http::HeaderMap;
use base64::Engine;
use serde::Serialize;
use serde_json::Value;

/// Revisions served without a handshake, newest first.
pub const STATELESS_VERSIONS: [&str; 1] = ["2026-07-28"];

const PROTOCOL_VERSION_KEY: &str = "io.modelcontextprotocol/protocolVersion";
const CLIENT_CAPABILITIES_KEY: &str = "io.modelcontextprotocol/clientCapabilities";
const VERSION_HEADER: &str = "mcp-protocol-version";
const METHOD_HEADER: &str = "mcp-method";
const NAME_HEADER: &str = "mcp-name";

/// The headers do not match the body, or a required one is missing or malformed.
pub const HEADER_MISMATCH: i64 = -32020;
/// The request's protocol version is not served; `data` lists the ones that are.
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// Whether a request belongs to the stateless era: it is `server/discover`, its
/// `_meta` names a protocol version (only 2026-07-28+ clients set that reserved
/// key), or its `MCP-Protocol-Version` header is no handshake revision (unknown
/// versions get the stateless era's structured refusal). `initialize` never is.
pub fn is_stateless(method: &str, params: &Value, header_version: Option<&str>) -> bool {
    match method {
        "initialize" => return false,
        "server/discover" => return true,
        _ => {}
    }
    let enveloped = params
        .get("_meta")
        .and_then(|meta| meta.get(PROTOCOL_VERSION_KEY))
        .is_some();
    enveloped || header_version.is_some_and(|v| !super::HANDSHAKE_VERSIONS.contains(&v))
}

/// Why a stateless request is refused before it is served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("params._meta must carry {PROTOCOL_VERSION_KEY} and {CLIENT_CAPABILITIES_KEY}")]
    MissingEnvelope,
    #[error("the {PROTOCOL_VERSION_KEY} in params._meta must be a string")]
    VersionNotAString,
    #[error("header mismatch: {0}")]
    HeaderMismatch(String),
    #[error("unsupported protocol version {requested}")]
    UnsupportedVersion { requested: String },
}

impl Refusal {
    /// The JSON-RPC error code the specification gives each refusal.
    pub fn code(&self) -> i64 {
        match self {
            Refusal::MissingEnvelope | Refusal::VersionNotAString => super::INVALID_PARAMS,
            Refusal::HeaderMismatch(_) => HEADER_MISMATCH,
            Refusal::UnsupportedVersion { .. } => UNSUPPORTED_PROTOCOL_VERSION,
        }
    }

    /// A stable name for logs and tests.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MissingEnvelope => "MissingEnvelope",
            Refusal::VersionNotAString => "VersionNotAString",
            Refusal::HeaderMismatch(_) => "HeaderMismatch",
            Refusal::UnsupportedVersion { .. } => "UnsupportedProtocolVersion",
        }
    }

    /// `UnsupportedProtocolVersionError`'s data: what is served, what was asked.
    pub fn data(&self) -> Option<Value> {
        match self {
            Refusal::UnsupportedVersion { requested } => Some(
                serde_json::to_value(UnsupportedVersionData {
                    supported: super::served_versions().collect(),
                    requested,
                })
                .expect("strings serialize"),
            ),
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct UnsupportedVersionData<'a> {
    supported: Vec<&'static str>,
    requested: &'a str,
}

/// Checks a stateless request: the `_meta` envelope, then every routing header
/// against the body (a client that disagrees with itself is told so before it is
/// told its version is not served), then the version. Returns the version.
pub fn check(headers: &HeaderMap, method: &str, params: &Value) -> Result<&'static str, Refusal> {
    let meta = params.get("_meta").filter(|m| m.is_object());
    let (Some(version), Some(_capabilities)) = (
        meta.and_then(|m| m.get(PROTOCOL_VERSION_KEY)),
        meta.and_then(|m| m.get(CLIENT_CAPABILITIES_KEY)),
    ) else {
        // No envelope, but a header naming a version we do not serve: say which we do.
        return Err(match header(headers, VERSION_HEADER) {
            Ok(Some(v)) if !STATELESS_VERSIONS.contains(&v) => Refusal::UnsupportedVersion {
                requested: v.to_string(),
            },
            _ => Refusal::MissingEnvelope,
        });
    };
    match header(headers, VERSION_HEADER)? {
        None => return mismatch("MCP-Protocol-Version header is missing"),
        Some(v) if Some(v) != version.as_str() => {
            return mismatch("MCP-Protocol-Version header does not match params._meta");
        }
        Some(_) => {}
    }
    check_routing(headers, method, params, true)?;
    let version = version.as_str().ok_or(Refusal::VersionNotAString)?;
    STATELESS_VERSIONS
        .into_iter()
        .find(|v| *v == version)
        .ok_or_else(|| Refusal::UnsupportedVersion {
            requested: version.to_string(),
        })
}

fn mismatch<T>(what: &str) -> Result<T, Refusal> {
    Err(Refusal::HeaderMismatch(what.to_string()))
}

/// Checks `Mcp-Method` against the body's method and, for `tools/call`, `Mcp-Name`
/// against `params.name` (for `tasks/*`, against `params.taskId`). `required` in the stateless era; in the handshake era,
/// which does not define them, headers that are sent must still agree with the
/// body: whoever routes on them must not be shown one call while another runs.
pub fn check_routing(
    headers: &HeaderMap,
    method: &str,
    params: &Value,
    required: bool,
) -> Result<(), Refusal> {
    match header(headers, METHOD_HEADER)? {
        None if required => return mismatch("Mcp-Method header is missing"),
        Some(m) if m != method => {
            return mismatch("Mcp-Method header does not match the body's method");
        }
        _ => {}
    }
    // The tasks extension routes `tasks/*` on the task id, as tools on their name.
    let named = match method {
        "tools/call" => "name",
        "tasks/get" | "tasks/update" | "tasks/cancel" => "taskId",
        _ => return Ok(()),
    };
    let name = header(headers, NAME_HEADER)?.map(decode_header_value);
    match (name, params.get(named).and_then(Value::as_str)) {
        (None, _) if required => mismatch("Mcp-Name header is missing"),
        (None, _) => Ok(()),
        (Some(None), _) => mismatch("Mcp-Name header is not valid base64 UTF-8"),
        (Some(Some(header)), body) if Some(header.as_str()) != body => Err(
            Refusal::HeaderMismatch(format!("Mcp-Name header does not match params.{named}")),
        ),
        _ => Ok(()),
    }
}

/// Checks the `Mcp-Param-{Name}` headers of a `tools/call` against its arguments,
/// for each property the tool's input schema marks with `x-mcp-header` (reachable
/// from the root through `properties` alone, as the transport defines it): a value
/// in the body needs its header, a header needs its value, and the two must agree.
pub fn check_param_headers(
    headers: &HeaderMap,
    input_schema: &Value,
    arguments: &Value,
) -> Result<(), Refusal> {
    let mut annotated = Vec::new();
    mirrored_properties(input_schema, &mut Vec::new(), &mut annotated);
    for (path, token, schema) in annotated {
        let name = format!("mcp-param-{}", token.to_ascii_lowercase());
        let value = path
            .iter()
            .try_fold(arguments, |value, key| value.get(key))
            .filter(|v| !v.is_null());
        let sent = header(headers, &name)?;
        let argument = path.join(".");
        let agrees = match (sent, value) {
            (None, None) => true,
            (Some(sent), Some(value)) => {
                decode_header_value(sent).is_some_and(|sent| header_matches(schema, value, &sent))
            }
            _ => false,
        };
        if !agrees {
            return Err(Refusal::HeaderMismatch(format!(
                "the {name} header does not match argument {argument}"
            )));
        }
    }
    Ok(())
}

/// The `x-mcp-header` annotations of `schema`: (property path, header token, property schema).
fn mirrored_properties<'s>(
    schema: &'s Value,
    path: &mut Vec<&'s str>,
    found: &mut Vec<(Vec<&'s str>, &'s str, &'s Value)>,
) {
    if let Some(token) = schema.get("x-mcp-header").and_then(Value::as_str)
        && !path.is_empty()
    {
        found.push((path.clone(), token, schema));
    }
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (key, property) in properties {
        path.push(key);
        mirrored_properties(property, path, found);
        path.pop();
    }
}

/// Whether a decoded header value renders `value` as clients do: strings as they
/// are, booleans as `true`/`false`, integers in decimal (compared as numbers, so
/// `42.0` matches `42`, as the transport advises).
fn header_matches(schema: &Value, value: &Value, sent: &str) -> bool {
    match value {
        Value::String(s) => s == sent,
        Value::Bool(b) => sent == if *b { "true" } else { "false" },
        Value::Number(n) if schema.get("type").and_then(Value::as_str) == Some("integer") => {
            let whole = sent
                .split_once('.')
                .filter(|(_, fraction)| fraction.bytes().all(|b| b == b'0'))
                .map_or(sent, |(whole, _)| whole);
            match (whole.parse::<i64>(), n.as_i64(), n.as_f64()) {
                (Ok(sent), Some(body), _) => sent == body,
                (Ok(sent), None, Some(body)) => body.fract() == 0.0 && sent as f64 == body,
                _ => false,
            }
        }
        Value::Number(n) => n.to_string() == sent,
        _ => false,
    }
}

/// A routing header's value: `None` when absent; a mismatch when it is sent twice
/// (first-copy and last-copy readers would disagree) or is not visible ASCII.
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Refusal> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Refusal::HeaderMismatch(format!(
            "{name} header is sent twice"
        )));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| Refusal::HeaderMismatch(format!("{name} header is not visible ASCII")))
}

/// A header value as sent, or decoded from the `=?base64?...?=` form clients use
/// for names that are not plain ASCII. `None` when the encoded form is malformed.
fn decode_header_value(value: &str) -> Option<String> {
    let Some(encoded) = value
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    else {
        return Some(value.to_string());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn call(name: &str, version: Value) -> Value {
        json!({"name": name, "arguments": {}, "_meta": {
            PROTOCOL_VERSION_KEY: version, CLIENT_CAPABILITIES_KEY: {}}})
    }

    const GOOD: [(&str, &str); 3] = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "notes"),
    ];

    #[test]
    fn a_consistent_request_passes_and_each_disagreement_is_a_header_mismatch() {
        let params = call("notes", json!("2026-07-28"));
        assert_eq!(
            check(&headers(&GOOD), "tools/call", &params),
            Ok("2026-07-28")
        );
        // The name in the base64 form clients use for names that are not plain ASCII.
        let encoded = [GOOD[0], GOOD[1], ("mcp-name", "=?base64?bm90ZXM=?=")];
        assert_eq!(
            check(&headers(&encoded), "tools/call", &params),
            Ok("2026-07-28")
        );

        // The attack: a gateway routes on the headers, the server runs the body.
        for (forged, why) in [
            ([GOOD[0], GOOD[1], ("mcp-name", "harmless")], "name"),
            ([GOOD[0], ("mcp-method", "tools/list"), GOOD[2]], "method"),
            (
                [("mcp-protocol-version", "2025-11-25"), GOOD[1], GOOD[2]],
                "version",
            ),
            (
                [GOOD[0], GOOD[1], ("mcp-name", "=?base64?aGFybWxlc3M=?=")],
                "encoded name",
            ),
            (
                [GOOD[0], GOOD[1], ("mcp-name", "=?base64?!!?=")],
                "bad base64",
            ),
        ] {
            let refusal = check(&headers(&forged), "tools/call", &params).unwrap_err();
            assert_eq!(refusal.code(), HEADER_MISMATCH, "{why}: {refusal}");
        }
        // Missing or doubled headers.
        for (i, sent) in GOOD.into_iter().enumerate() {
            let mut missing = GOOD.to_vec();
            missing.remove(i);
            let refusal = check(&headers(&missing), "tools/call", &params).unwrap_err();
            assert_eq!(refusal.reason(), "HeaderMismatch", "{missing:?}");
            let mut doubled = GOOD.to_vec();
            doubled.push(sent);
            let refusal = check(&headers(&doubled), "tools/call", &params).unwrap_err();
            assert_eq!(refusal.reason(), "HeaderMismatch", "{doubled:?}");
        }
    }

    #[test]
    fn handshake_requests_need_no_routing_headers_but_those_sent_must_agree() {
        let params = json!({"name": "notes"});
        assert_eq!(
            check_routing(&HeaderMap::new(), "tools/call", &params, false),
            Ok(())
        );
        assert_eq!(
            check_routing(&headers(&GOOD[1..]), "tools/call", &params, false),
            Ok(())
        );
        for forged in [
            vec![("mcp-method", "tools/list")],
            vec![("mcp-name", "harmless")],
            vec![GOOD[1], ("mcp-name", "=?base64?aGFybWxlc3M=?=")],
        ] {
            let refusal = check_routing(&headers(&forged), "tools/call", &params, false);
            assert_eq!(refusal.unwrap_err().code(), HEADER_MISMATCH, "{forged:?}");
        }
    }

    #[test]
    fn mirrored_arguments_must_match_their_headers() {
        let schema = json!({"type": "object", "properties": {
            "region": {"type": "string", "x-mcp-header": "Region"},
            "shard": {"type": "integer", "x-mcp-header": "Shard"},
            "options": {"type": "object", "properties": {
                "dry": {"type": "boolean", "x-mcp-header": "Dry"}}},
            "query": {"type": "string"},
            "list": {"type": "array", "items": {"x-mcp-header": "Item"}}}});
        let args = json!({"region": "eu-west1", "shard": 7, "options": {"dry": true},
                          "query": "x", "list": ["a"]});
        let good = [
            ("mcp-param-region", "eu-west1"),
            ("mcp-param-shard", "7.0"),
            ("mcp-param-dry", "true"),
        ];
        assert_eq!(check_param_headers(&headers(&good), &schema, &args), Ok(()));
        let encoded = [
            ("mcp-param-region", "=?base64?ZXUtd2VzdDE=?="),
            good[1],
            good[2],
        ];
        assert_eq!(
            check_param_headers(&headers(&encoded), &schema, &args),
            Ok(())
        );
        // No values, no headers: nothing to check (null is no value).
        let none = json!({"region": null, "query": "x"});
        assert_eq!(
            check_param_headers(&HeaderMap::new(), &schema, &none),
            Ok(())
        );

        // The attack: a gateway routes on the header, the tool gets the body's value.
        for (i, forged) in ["us-east1", "8", "false"].into_iter().enumerate() {
            let mut sent = good;
            sent[i].1 = forged;
            let refusal = check_param_headers(&headers(&sent), &schema, &args).unwrap_err();
            assert_eq!(refusal.code(), HEADER_MISMATCH, "{forged}");
            // A header left out, a header for a value that is not in the body.
            let mut missing = good.to_vec();
            missing.remove(i);
            assert!(check_param_headers(&headers(&missing), &schema, &args).is_err());
            let mut doubled = good.to_vec();
            doubled.push(good[i]);
            assert!(check_param_headers(&headers(&doubled), &schema, &args).is_err());
        }
        assert!(check_param_headers(&headers(&good), &schema, &none).is_err());
    }

    #[test]
    fn envelope_and_version_refusals() {
        let good = headers(&GOOD);
        let no_meta = json!({"name": "notes"});
        assert_eq!(
            check(&good, "tools/call", &no_meta),
            Err(Refusal::MissingEnvelope)
        );
        let half = json!({"name": "notes", "_meta": {PROTOCOL_VERSION_KEY: "2026-07-28"}});
        assert_eq!(
            check(&good, "tools/call", &half),
            Err(Refusal::MissingEnvelope)
        );
        // A version this server does not speak, consistent in header and body.
        let future = [("mcp-protocol-version", "2099-01-01"), GOOD[1], GOOD[2]];
        let refusal = check(
            &headers(&future),
            "tools/call",
            &call("notes", json!("2099-01-01")),
        )
        .unwrap_err();
        assert_eq!(refusal.code(), UNSUPPORTED_PROTOCOL_VERSION);
        assert_eq!(
            refusal.data(),
            Some(
                json!({"supported": ["2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26"],
                        "requested": "2099-01-01"})
            )
        );
        // The same without an envelope: still told what is served.
        let refusal = check(&headers(&future), "tools/call", &no_meta).unwrap_err();
        assert_eq!(refusal.code(), UNSUPPORTED_PROTOCOL_VERSION);
    }

    #[test]
    fn the_era_is_the_envelope_or_an_unknown_header_version() {
        let enveloped = call("notes", json!("2026-07-28"));
        assert!(is_stateless("tools/call", &enveloped, None));
        assert!(!is_stateless("initialize", &enveloped, Some("2026-07-28")));
        assert!(!is_stateless("tools/call", &json!({}), Some("2025-11-25")));
        assert!(!is_stateless("tools/call", &json!({}), None));
        assert!(is_stateless("tools/call", &json!({}), Some("2026-07-28")));
        assert!(is_stateless("tools/list", &json!(null), Some("1999-01-01")));
        assert!(is_stateless("server/discover", &json!(null), None));
    }
}

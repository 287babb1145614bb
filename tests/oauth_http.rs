//! The runner as an OAuth protected resource, over real HTTP on loopback: an
//! identity provider (metadata + JWKS, keys generated here) on one port, the
//! runner on another. Written as attacks: tokens for another resource, expired,
//! from another issuer, signed by a stranger's key, `alg` confusion, floods of
//! unknown key ids; and the listings two callers see. No tool runs here (the
//! audit log shows none started): only who may ask is under test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use toolwarden::runner::audit::{AuditKey, AuditLog};
use toolwarden::runner::auth::Authenticator;
use toolwarden::runner::oauth::{OAuthResource, OAuthSettings};
use toolwarden::runner::pipeline::Runner;
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::registry::{Registry, manifest_files};
use toolwarden::runner::router;
use toolwarden::runner::tool::SecretsDir;
use toolwarden::runner::unsandboxed::UnsandboxedProcessExecutor;

const SCOPE: &str = "tools:call";

/// Everyone may call `lookup`; `admin-reset` only admins (decided by the caller
/// alone); `own-profile` whoever names themselves (decided by the input).
const TOOLS: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: lookup}
spec:
  description: Looks a word up
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {word: {type: string, maxLength: 32}}}
  runtime: {image: "busybox:1.36.1", command: [/bin/false]}
---
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: admin-reset}
spec:
  description: Resets everything
  risk: medium
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  authorization:
    - expression: '"admins" in caller.groups'
      message: admins only
  runtime: {image: "busybox:1.36.1", command: [/bin/false]}
---
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: own-profile}
spec:
  description: Updates the caller's own profile
  risk: medium
  inputSchema: {type: object, additionalProperties: false, required: [userId], properties: {userId: {type: string, maxLength: 64}}}
  authorization:
    - expression: 'caller.sub == input.userId'
  runtime: {image: "busybox:1.36.1", command: [/bin/false]}
"#;

/// An ES256 signing key with its public JWK.
struct SigningKey {
    kid: String,
    private: EncodingKey,
    public_pem: Vec<u8>,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw(); // 0x04 || X || Y
        assert_eq!(raw.len(), 65);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        SigningKey {
            kid: kid.into(),
            private: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            public_pem: pair.public_key_pem().into_bytes(),
            jwk: json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                        "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.private).unwrap()
    }
}

/// An identity provider on loopback: OpenID discovery and a JWKS that can be
/// rotated, counting how often the keys are fetched.
struct IdentityProvider {
    issuer: String,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl IdentityProvider {
    async fn start(keys: &[&SigningKey]) -> IdentityProvider {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A realm path, as Keycloak issues: discovery must keep it.
        let issuer = format!("http://{}/realms/agents", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(Value::Null));
        let fetches = Arc::new(AtomicUsize::new(0));
        let metadata = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/protocol/openid-connect/certs"),
                              "authorization_endpoint": format!("{issuer}/auth"),
                              "token_endpoint": format!("{issuer}/token")});
        let (served, counted) = (jwks.clone(), fetches.clone());
        let app = axum::Router::new()
            .route(
                "/realms/agents/.well-known/openid-configuration",
                get(move || async move { axum::Json(metadata) }),
            )
            .route(
                "/realms/agents/protocol/openid-connect/certs",
                get(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = served.lock().unwrap().clone();
                    async move { axum::Json(body) }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let idp = IdentityProvider {
            issuer,
            jwks,
            fetches,
        };
        idp.publish(keys);
        idp
    }

    fn publish(&self, keys: &[&SigningKey]) {
        let keys: Vec<&Value> = keys.iter().map(|k| &k.jwk).collect();
        *self.jwks.lock().unwrap() = json!({"keys": keys});
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

struct Server {
    base: String,
    resource: String,
    audit_path: std::path::PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The runner, protected by `idp`, its resource URL ending in `/mcp`.
async fn serve(idp: &IdentityProvider, refresh_interval: Option<Duration>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tools.yaml"), TOOLS).unwrap();
    let registry = Arc::new(Registry::new(LimiterClock::real(), SecretsDir(None)));
    let report = registry.load(&manifest_files(dir.path()).unwrap());
    assert!(
        report.errors.is_empty() && report.refused.is_empty(),
        "{report:?}"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let resource = format!("{base}/mcp");
    let mut oauth = OAuthResource::start(OAuthSettings {
        resource: resource.clone(),
        issuers: vec![idp.issuer.clone()],
        jwks_file: None,
        scopes: vec![SCOPE.into()],
    })
    .await
    .unwrap();
    if let Some(interval) = refresh_interval {
        oauth.refresh_interval = interval;
    }
    let audit_path = dir.path().join("audit.log");
    let key = AuditKey::new(b"oauth-http-test-audit-key-32-bytes!!").unwrap();
    let runner = Arc::new(Runner::new(
        registry,
        Authenticator {
            oauth: Some(oauth),
            ..Authenticator::default()
        },
        AuditLog::open_file(&audit_path, key).unwrap(),
        Arc::new(UnsandboxedProcessExecutor),
    ));
    tokio::spawn(router::serve(listener, runner, std::future::pending()));
    Server {
        base,
        resource,
        audit_path,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Server {
    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn mcp(&self, token: Option<&str>, message: Value) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/mcp", self.base))
            .header("accept", "application/json, text/event-stream")
            .json(&message);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn invoke(&self, token: &str, tool: &str, input: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/tools/{tool}/invoke", self.base))
            .bearer_auth(token)
            .json(&input)
            .send()
            .await
            .unwrap()
    }

    /// Names of the tools `GET /v1/tools` and MCP `tools/list` show `token`'s caller.
    async fn listed(&self, token: &str) -> (Vec<String>, Vec<String>) {
        let names = |tools: &Value| -> Vec<String> {
            let mut names: Vec<String> = tools
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        };
        let rest: Value = self
            .get("/v1/tools", Some(token))
            .await
            .json()
            .await
            .unwrap();
        let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
        let mcp: Value = self.mcp(Some(token), list).await.json().await.unwrap();
        (names(&rest["tools"]), names(&mcp["result"]["tools"]))
    }

    fn started_runs(&self) -> usize {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(r#""event":"started""#))
            .count()
    }
}

fn claims(idp: &IdentityProvider, sub: &str, groups: &[&str], aud: &str) -> Value {
    let now = jiff::Timestamp::now().as_second();
    json!({"iss": idp.issuer, "sub": sub, "aud": aud, "groups": groups, "scope": format!("openid {SCOPE}"),
           "iat": now, "exp": now + 300})
}

fn challenge(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_metadata_names_the_resource_its_issuer_and_scopes_and_every_refusal_points_to_it() {
    let key = SigningKey::generate("k1");
    let idp = IdentityProvider::start(&[&key]).await;
    let server = serve(&idp, None).await;
    let base = &server.base;
    let expected = json!({
        "resource": server.resource,
        "authorization_servers": [idp.issuer],
        "scopes_supported": [SCOPE],
        "bearer_methods_supported": ["header"],
        "resource_name": "toolwarden",
    });
    // RFC 9728: at the well-known path with the resource's path after it, and
    // (for clients that try the root) without; public, no token.
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let response = server.get(path, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.json::<Value>().await.unwrap(), expected, "{path}");
    }
    let other = server
        .get("/.well-known/oauth-protected-resource/other", None)
        .await;
    assert_eq!(other.status(), StatusCode::NOT_FOUND);

    let wanted = format!(
        "Bearer resource_metadata=\"{base}/.well-known/oauth-protected-resource/mcp\", scope=\"{SCOPE}\""
    );
    let no_token = server.get("/v1/tools", None).await;
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&no_token), wanted);
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let mcp = server.mcp(Some("not-a-token"), list).await;
    assert_eq!(mcp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&mcp), wanted);

    // A valid token without the scope: 403 insufficient_scope, with what to ask for.
    let mut scopeless = claims(&idp, "alice", &[], &server.resource);
    scopeless["scope"] = "openid".into();
    let response = server.get("/v1/tools", Some(&key.sign(&scopeless))).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let header = challenge(&response);
    assert!(
        header.starts_with("Bearer error=\"insufficient_scope\""),
        "{header}"
    );
    assert!(header.contains(&format!("scope=\"{SCOPE}\"")), "{header}");
    assert!(header.contains("resource_metadata="), "{header}");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://toolwarden.dev/problems/insufficient-scope"
    );
    // The same on MCP, before the message is read.
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let mcp = server.mcp(Some(&key.sign(&scopeless)), list).await;
    assert_eq!(mcp.status(), StatusCode::FORBIDDEN);
    assert!(
        challenge(&mcp).contains("error=\"insufficient_scope\""),
        "{}",
        challenge(&mcp)
    );

    // The scope as an `scp` array (Okta, Entra ID) counts as well; a trailing
    // slash or upper-case host in `aud` names the same resource.
    let mut scp = claims(
        &idp,
        "alice",
        &[],
        &format!("{}/", server.resource.replacen("http", "HTTP", 1)),
    );
    scp.as_object_mut().unwrap().remove("scope");
    scp["scp"] = json!([SCOPE]);
    let response = server.get("/v1/tools", Some(&key.sign(&scp))).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn tokens_for_another_resource_expired_forged_or_from_elsewhere_are_refused() {
    let key = SigningKey::generate("k1");
    let stranger = SigningKey::generate("k1"); // same kid, another key
    let idp = IdentityProvider::start(&[&key]).await;
    let server = serve(&idp, None).await;
    let good = claims(&idp, "alice", &["admins"], &server.resource);
    assert_eq!(
        server
            .get("/v1/tools", Some(&key.sign(&good)))
            .await
            .status(),
        StatusCode::OK
    );

    let now = jiff::Timestamp::now().as_second();
    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        c[field] = value;
        c
    };
    let without = |field: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(field);
        c
    };
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(&key.public_pem)).unwrap()
    };
    let unsigned = {
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "kid": "k1"})),
            b64(&good)
        )
    };
    let attacks: Vec<(&str, String)> = vec![
        // RFC 8707: minted for another MCP server of the same provider.
        (
            "another resource",
            key.sign(&with("aud", json!("https://other.example.com/mcp"))),
        ),
        (
            "another resource's prefix",
            key.sign(&with("aud", json!(format!("{}x", server.resource)))),
        ),
        (
            "several audiences, none this one",
            key.sign(&with("aud", json!(["a", "b"]))),
        ),
        ("no audience", key.sign(&without("aud"))),
        ("expired", key.sign(&with("exp", json!(now - 3600)))),
        ("not yet valid", key.sign(&with("nbf", json!(now + 3600)))),
        ("no expiry", key.sign(&without("exp"))),
        ("empty subject", key.sign(&with("sub", json!("")))),
        (
            "another issuer",
            key.sign(&with("iss", json!("https://evil.example.com"))),
        ),
        ("no issuer", key.sign(&without("iss"))),
        ("a stranger's key under a known kid", stranger.sign(&good)),
        ("HS256 with the public key as secret", hs256_with_public_key),
        ("alg none", unsigned),
    ];
    let fetches = idp.fetches();
    for (attack, token) in &attacks {
        let response = server.get("/v1/tools", Some(token)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{attack}");
        assert!(
            challenge(&response).contains("resource_metadata="),
            "{attack}"
        );
        let call = server.invoke(token, "lookup", json!({"word": "x"})).await;
        assert_eq!(call.status(), StatusCode::UNAUTHORIZED, "{attack}");
    }
    // None of them made the runner fetch keys (their kid is known, or their issuer is not).
    assert_eq!(idp.fetches(), fetches);
    assert_eq!(server.started_runs(), 0, "a refused caller's call ran");
    // The audit log says why, without the token.
    let log = std::fs::read_to_string(&server.audit_path).unwrap();
    assert!(log.contains("OAuth") || log.contains("oauth"), "{log}");
    assert!(
        log.contains("is for [\\\"https://other.example.com/mcp\\\"]"),
        "{log}"
    );
    assert!(
        !log.contains(&attacks[0].1),
        "a token reached the audit log"
    );
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_a_flood_of_unknown_key_ids_is_not_passed_on() {
    let old = SigningKey::generate("2026-11");
    let new = SigningKey::generate("2026-12");
    let idp = IdentityProvider::start(&[&old]).await;
    let server = serve(&idp, Some(Duration::ZERO)).await;
    assert_eq!(idp.fetches(), 1, "keys are fetched at start");
    let token = |key: &SigningKey| key.sign(&claims(&idp, "alice", &[], &server.resource));
    assert_eq!(
        server.get("/v1/tools", Some(&token(&old))).await.status(),
        StatusCode::OK
    );
    assert_eq!(idp.fetches(), 1, "a known key costs no fetch");

    // The provider rotates: the new key's first token makes the runner fetch again.
    idp.publish(&[&new]);
    assert_eq!(
        server.get("/v1/tools", Some(&token(&new))).await.status(),
        StatusCode::OK
    );
    assert_eq!(idp.fetches(), 2);
    // The retired key is gone from the set, so its tokens are refused.
    assert_eq!(
        server.get("/v1/tools", Some(&token(&old))).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // With the default interval, forged key ids cannot make the runner hammer the provider.
    let idp = IdentityProvider::start(&[&old]).await;
    let server = serve(&idp, None).await;
    let fetched_at_start = idp.fetches();
    for i in 0..40 {
        let forged = SigningKey::generate(&format!("forged-{i}"));
        let response = server.get("/v1/tools", Some(&token(&forged))).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(
        idp.fetches() <= fetched_at_start + 1,
        "{} fetches for 40 unknown key ids",
        idp.fetches() - fetched_at_start
    );
}

#[tokio::test]
async fn two_callers_see_only_the_tools_their_identity_lets_them_call() {
    let key = SigningKey::generate("k1");
    let idp = IdentityProvider::start(&[&key]).await;
    let server = serve(&idp, None).await;
    let alice = key.sign(&claims(&idp, "alice", &["admins"], &server.resource));
    let bob = key.sign(&claims(&idp, "bob", &["devs"], &server.resource));
    let all = vec![
        "admin-reset".to_string(),
        "lookup".into(),
        "own-profile".into(),
    ];
    let not_admin = vec!["lookup".to_string(), "own-profile".into()];
    assert_eq!(server.listed(&alice).await, (all.clone(), all));
    // own-profile depends on the input: listed for bob, decided when he calls.
    assert_eq!(
        server.listed(&bob).await,
        (not_admin.clone(), not_admin.clone())
    );
    let openapi: Value = server
        .get("/openapi.json", Some(&bob))
        .await
        .json()
        .await
        .unwrap();
    let paths: Vec<&String> = openapi["paths"].as_object().unwrap().keys().collect();
    assert!(
        !paths.iter().any(|p| p.contains("admin-reset")),
        "{paths:?}"
    );
    assert!(paths.iter().any(|p| p.contains("lookup")), "{paths:?}");

    // Hidden is not the only guard: calling it anyway is refused, and nothing runs.
    let call = server.invoke(&bob, "admin-reset", json!({})).await;
    assert_eq!(call.status(), StatusCode::FORBIDDEN);
    let someone_else = server
        .invoke(&bob, "own-profile", json!({"userId": "alice"}))
        .await;
    assert_eq!(someone_else.status(), StatusCode::FORBIDDEN);
    assert_eq!(server.started_runs(), 0);
}

#[tokio::test]
async fn settings_that_cannot_protect_anything_are_refused_at_start() {
    let key = SigningKey::generate("k1");
    let idp = IdentityProvider::start(&[&key]).await;
    let settings = |resource: &str, issuer: &str| OAuthSettings {
        resource: resource.into(),
        issuers: vec![issuer.into()],
        jwks_file: None,
        scopes: vec![],
    };
    let cases = [
        // Plain http to a remote host: tokens and keys would cross the network in clear.
        (
            settings("http://tools.example.com/mcp", &idp.issuer),
            "BadUrl",
        ),
        (
            settings("https://tools.example.com/mcp#x", &idp.issuer),
            "BadUrl",
        ),
        (settings("tools.example.com", &idp.issuer), "BadUrl"),
        (
            settings("https://tools.example.com", "http://idp.example.com"),
            "BadUrl",
        ),
        // The metadata must name the issuer exactly (RFC 8414 3.3): a typo is caught.
        (
            settings("https://tools.example.com", &format!("{}/", idp.issuer)),
            "NoIssuerMetadata",
        ),
    ];
    for (settings, reason) in cases {
        let shown = format!("{settings:?}");
        let Err(e) = OAuthResource::start(settings).await else {
            panic!("accepted: {shown}");
        };
        assert_eq!(e.reason(), reason, "{shown}: {e}");
    }
    let mut bad_scope = settings("https://tools.example.com", &idp.issuer);
    bad_scope.scopes = vec!["a\"b".into()];
    assert_eq!(
        OAuthResource::start(bad_scope)
            .await
            .err()
            .unwrap()
            .reason(),
        "BadScope"
    );
    // Keys from a file: symmetric keys in it are never used.
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}).to_string(),
    )
    .unwrap();
    let mut from_file = settings("https://tools.example.com", &idp.issuer);
    from_file.jwks_file = Some(jwks.clone());
    assert_eq!(
        OAuthResource::start(from_file.clone())
            .await
            .err()
            .unwrap()
            .reason(),
        "NoUsableKey"
    );
    std::fs::write(&jwks, json!({"keys": [key.jwk]}).to_string()).unwrap();
    let resource = OAuthResource::start(from_file).await.unwrap();
    let token = key.sign(&claims(&idp, "carol", &[], "https://tools.example.com"));
    assert_eq!(resource.verify(&token).await.unwrap().sub, "carol");
}

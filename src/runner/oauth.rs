//! The runner as an OAuth 2.0 protected resource, as the MCP authorization
//! specification requires: its metadata (RFC 9728), the `WWW-Authenticate`
//! challenges that point clients to it (RFC 6750, with scope hints), and JWT
//! access tokens verified against each authorization server's JWKS, which
//! must be minted for this resource (RFC 8707 audience).
//!
//! Keys come from a file or from the issuer's metadata (RFC 8414, then OpenID
//! Connect discovery). They are cached; a token signed with a key id the cache
//! does not hold triggers one refetch (the issuer rotated its keys), at most
//! once per `refresh_interval` per issuer, so a flood of forged key ids costs
//! the identity provider nothing. A token naming an issuer that is not
//! configured never causes a fetch.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};

use super::problem::ProblemKind;

/// Clock skew allowed on `exp` and `nbf` (as for the other JWTs).
const LEEWAY_SECS: u64 = 30;
/// Keys older than this are refetched on next use, so revoked keys go away.
const KEY_MAX_AGE: Duration = Duration::from_secs(600);
/// Default least time between two fetches of one issuer's keys.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Largest metadata or JWKS document read.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Time allowed for one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the OAuth settings cannot be used; `serve` refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum OAuthConfigError {
    #[error(
        "{what} {url:?} must be an absolute https:// URL without a fragment \
         (http:// only on a loopback address)"
    )]
    BadUrl { what: &'static str, url: String },
    #[error(
        "--oauth-issuer is required with --oauth-resource (the authorization server(s) clients get tokens from)"
    )]
    NoIssuer,
    #[error("--oauth-jwks names the keys of one issuer: give exactly one --oauth-issuer with it")]
    JwksNeedsOneIssuer,
    #[error(
        "scope {0:?} is not an RFC 6749 scope token (printable ASCII, no space, quote or backslash)"
    )]
    BadScope(String),
    #[error("keys of {issuer}: {source}")]
    Keys { issuer: String, source: KeysError },
}

impl OAuthConfigError {
    /// Stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            OAuthConfigError::BadUrl { .. } => "BadUrl",
            OAuthConfigError::NoIssuer => "NoIssuer",
            OAuthConfigError::JwksNeedsOneIssuer => "JwksNeedsOneIssuer",
            OAuthConfigError::BadScope(_) => "BadScope",
            OAuthConfigError::Keys { source, .. } => source.reason(),
        }
    }
}

/// Why an issuer's keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("GET {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url}: not a JWK set: {source}")]
    NotJwks {
        url: String,
        source: serde_json::Error,
    },
    #[error(
        "no authorization server metadata names issuer {issuer} \
         (tried {tried}); check --oauth-issuer against the provider's `issuer`"
    )]
    NoMetadata { issuer: String, tried: String },
    #[error("jwks_uri {0:?} is not https:// (or http:// on loopback)")]
    InsecureJwksUri(String),
    #[error(
        "the key set holds no usable signing key (RSA, EC or OKP; symmetric keys are never taken from a JWKS)"
    )]
    NoUsableKey,
}

impl KeysError {
    /// Stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            KeysError::Read { .. } => "JwksUnreadable",
            KeysError::Fetch { .. } => "FetchFailed",
            KeysError::NotJwks { .. } => "NotJwks",
            KeysError::NoMetadata { .. } => "NoIssuerMetadata",
            KeysError::InsecureJwksUri(_) => "InsecureJwksUri",
            KeysError::NoUsableKey => "NoUsableKey",
        }
    }
}

/// Why an access token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenRejection {
    #[error("oauth: {0}")]
    Malformed(jsonwebtoken::errors::Error),
    #[error("oauth: issuer {0:?} is not configured")]
    UnknownIssuer(String),
    #[error("oauth: no key {kid:?} in the keys of {issuer}")]
    UnknownKey { issuer: String, kid: Option<String> },
    #[error("oauth: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("oauth: the token is for {audiences:?}, not this resource ({resource})")]
    WrongAudience {
        audiences: Vec<String>,
        resource: String,
    },
    #[error("oauth: the sub claim is empty")]
    EmptySubject,
}

impl TokenRejection {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenRejection::Malformed(_) => "OAuthTokenMalformed",
            TokenRejection::UnknownIssuer(_) => "OAuthUnknownIssuer",
            TokenRejection::UnknownKey { .. } => "OAuthUnknownKey",
            TokenRejection::Invalid(_) => "OAuthTokenInvalid",
            TokenRejection::WrongAudience { .. } => "OAuthWrongAudience",
            TokenRejection::EmptySubject => "JwtEmptySubject",
        }
    }
}

/// Who an access token speaks for, once verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub sub: String,
    pub groups: Vec<String>,
    pub scopes: Vec<String>,
}

/// Where an issuer's keys come from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A JWKS file, read again when a token names a key it lacks.
    File(PathBuf),
    /// The `jwks_uri` of the issuer's metadata, discovered at start.
    Discovered,
}

/// One verification key of a JWKS, with the algorithms it may verify.
struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

struct KeyCache {
    keys: Vec<VerifyKey>,
    fetched: Instant,
}

/// One authorization server.
struct Issuer {
    issuer: String,
    source: KeySource,
    /// Set when the keys are discovered from metadata.
    jwks_uri: Option<String>,
    cache: std::sync::RwLock<KeyCache>,
    /// When the keys were last fetched (or tried); held while fetching, so
    /// concurrent calls wait for one fetch instead of making their own.
    last_fetch: tokio::sync::Mutex<Instant>,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<bytes::Bytes>>;

/// The runner as a protected resource.
pub struct OAuthResource {
    /// This server's canonical URI: the audience tokens must carry.
    resource: String,
    /// Required in every token; advertised as `scopes_supported`.
    scopes: Vec<String>,
    issuers: Vec<Issuer>,
    http: HttpClient,
    /// Least time between two fetches of one issuer's keys.
    pub refresh_interval: Duration,
}

/// `--oauth-*` as given.
#[derive(Clone, Debug, Default)]
pub struct OAuthSettings {
    pub resource: String,
    pub issuers: Vec<String>,
    pub jwks_file: Option<PathBuf>,
    pub scopes: Vec<String>,
}

impl OAuthResource {
    /// Checks the settings and loads every issuer's keys (a provider that
    /// cannot be reached now is an error, not a runner that refuses everyone).
    pub async fn start(settings: OAuthSettings) -> Result<OAuthResource, OAuthConfigError> {
        check_url("--oauth-resource", &settings.resource)?;
        if settings.issuers.is_empty() {
            return Err(OAuthConfigError::NoIssuer);
        }
        if settings.jwks_file.is_some() && settings.issuers.len() != 1 {
            return Err(OAuthConfigError::JwksNeedsOneIssuer);
        }
        for issuer in &settings.issuers {
            check_url("--oauth-issuer", issuer)?;
        }
        if let Some(bad) = settings.scopes.iter().find(|s| !is_scope_token(s)) {
            return Err(OAuthConfigError::BadScope(bad.clone()));
        }
        let http = http_client();
        let mut issuers = Vec::new();
        for name in settings.issuers {
            let fail = |source| OAuthConfigError::Keys {
                issuer: name.clone(),
                source,
            };
            let (source, jwks_uri) = match &settings.jwks_file {
                Some(path) => (KeySource::File(path.clone()), None),
                None => (
                    KeySource::Discovered,
                    Some(discover_jwks_uri(&http, &name).await.map_err(fail)?),
                ),
            };
            let keys = load_keys(&http, &source, jwks_uri.as_deref())
                .await
                .map_err(fail)?;
            issuers.push(Issuer {
                issuer: name,
                source,
                jwks_uri,
                cache: std::sync::RwLock::new(KeyCache {
                    keys,
                    fetched: Instant::now(),
                }),
                last_fetch: tokio::sync::Mutex::new(Instant::now()),
            });
        }
        Ok(OAuthResource {
            resource: settings.resource,
            scopes: settings.scopes,
            issuers,
            http,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
        })
    }

    /// Short description for the startup banner.
    pub fn describe(&self) -> String {
        let issuers: Vec<&str> = self.issuers.iter().map(|i| i.issuer.as_str()).collect();
        format!(
            "OAuth access tokens for {} from {}",
            self.resource,
            issuers.join(", ")
        )
    }

    /// The host name of the resource URL, which clients put in `Host`.
    pub fn host(&self) -> Option<String> {
        let uri: Uri = self.resource.parse().ok()?;
        uri.host()
            .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
    }

    /// The scopes every token must carry.
    pub fn required_scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Whether the token names one of the configured issuers (unverified: only
    /// to pick the verifier; the signature and `iss` are checked after).
    pub fn claims_issuer(&self, token: &str) -> bool {
        unverified_issuer(token).is_some_and(|iss| self.issuers.iter().any(|i| i.issuer == iss))
    }

    /// Verifies an access token: signature by a key of its issuer, `exp`,
    /// `nbf`, `iss`, and an audience that is this resource.
    pub async fn verify(&self, token: &str) -> Result<Verified, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(TokenRejection::Malformed)?;
        let iss = unverified_issuer(token).unwrap_or_default();
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| TokenRejection::UnknownIssuer(iss.clone()))?;
        let kid = header.kid.as_deref();
        if !issuer.has_fresh_key(kid) {
            issuer.refresh(&self.http, self.refresh_interval).await;
        }
        let claims = issuer.decode(token, header.alg, kid)?;
        let audiences = claims.aud.into_vec();
        let wanted = canonical(&self.resource);
        if !audiences.iter().any(|aud| canonical(aud) == wanted) {
            return Err(TokenRejection::WrongAudience {
                audiences,
                resource: self.resource.clone(),
            });
        }
        if claims.sub.is_empty() {
            return Err(TokenRejection::EmptySubject);
        }
        let mut scopes: Vec<String> = claims
            .scope
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        scopes.extend(claims.scp.unwrap_or_default());
        Ok(Verified {
            sub: claims.sub,
            groups: claims.groups,
            scopes,
        })
    }

    /// The URL of this resource's metadata (RFC 9728 section 3.1: the
    /// well-known path inserted before the resource's own path).
    pub fn metadata_url(&self) -> String {
        let uri: Uri = self.resource.parse().expect("checked at start");
        let path = uri.path().trim_end_matches('/');
        format!(
            "{}://{}{}{path}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map_or("", |a| a.as_str()),
            METADATA_PATH
        )
    }

    /// Whether `path` (of a request to this server) is where the metadata is
    /// served: the well-known path alone, or with the resource's path after it.
    pub fn serves_metadata_at(&self, path: &str) -> bool {
        let own = self
            .metadata_url()
            .parse::<Uri>()
            .map(|u| u.path().to_string())
            .unwrap_or_default();
        path == METADATA_PATH || path == own
    }

    /// The protected resource metadata document (RFC 9728 section 2).
    pub fn metadata(&self) -> Value {
        let mut document = json!({
            "resource": self.resource,
            "authorization_servers": self.issuers.iter().map(|i| &i.issuer).collect::<Vec<_>>(),
            "bearer_methods_supported": ["header"],
            "resource_name": "toolwarden",
        });
        if !self.scopes.is_empty() {
            document["scopes_supported"] = json!(self.scopes);
        }
        document
    }

    /// Adds the challenge to a refusal: on `401`, where the metadata is and
    /// the scopes to ask for; on `403` for missing scopes, RFC 6750's
    /// `insufficient_scope` with the scopes the call needs.
    pub fn challenge<B>(&self, response: &mut Response<B>) {
        let kind = response.extensions().get::<ProblemKind>().copied();
        let scope = self.scopes.join(" ");
        let mut value = match (response.status(), kind) {
            (StatusCode::UNAUTHORIZED, _) => "Bearer ".to_string(),
            (StatusCode::FORBIDDEN, Some(ProblemKind::InsufficientScope)) => {
                "Bearer error=\"insufficient_scope\", error_description=\"the access token \
                 lacks a scope this resource requires\", "
                    .to_string()
            }
            _ => return,
        };
        value.push_str(&format!("resource_metadata=\"{}\"", self.metadata_url()));
        if !scope.is_empty() {
            value.push_str(&format!(", scope=\"{scope}\""));
        }
        // Every part was checked at start to be a valid header value.
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
}

/// Where RFC 9728 metadata lives.
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

impl Issuer {
    fn has_fresh_key(&self, kid: Option<&str>) -> bool {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.fetched.elapsed() < KEY_MAX_AGE
            && cache
                .keys
                .iter()
                .any(|k| kid.is_none() || k.kid.as_deref() == kid)
    }

    /// Fetches the keys again, unless that was done less than `interval`
    /// ago; a failed fetch keeps the keys there were.
    async fn refresh(&self, http: &HttpClient, interval: Duration) {
        let mut last = self.last_fetch.lock().await;
        if last.elapsed() < interval {
            return;
        }
        *last = Instant::now();
        match load_keys(http, &self.source, self.jwks_uri.as_deref()).await {
            Ok(keys) => {
                tracing::info!(issuer = %self.issuer, keys = keys.len(), "fetched the issuer's keys");
                *self.cache.write().unwrap_or_else(|e| e.into_inner()) = KeyCache {
                    keys,
                    fetched: Instant::now(),
                };
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "cannot refresh the issuer's keys; keeping the old ones");
            }
        }
    }

    fn decode(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<AccessClaims, TokenRejection> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let candidates: Vec<&VerifyKey> = cache
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.algorithms.contains(&alg))
            .collect();
        if candidates.is_empty() {
            return Err(TokenRejection::UnknownKey {
                issuer: self.issuer.clone(),
                kid: kid.map(String::from),
            });
        }
        let mut last = None;
        for key in candidates {
            // Only the header's algorithm, and only when it fits the key's type:
            // never an HMAC "signed" with a public key.
            let mut validation = Validation::new(alg);
            validation.leeway = LEEWAY_SECS;
            validation.validate_nbf = true;
            validation.validate_aud = false; // checked by the caller, canonicalized
            validation.set_issuer(&[&self.issuer]);
            validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
            match jsonwebtoken::decode::<AccessClaims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = Some(e),
            }
        }
        Err(TokenRejection::Invalid(
            last.expect("at least one candidate"),
        ))
    }
}

#[derive(Deserialize)]
struct AccessClaims {
    sub: String,
    aud: OneOrMany,
    #[serde(default)]
    groups: Vec<String>,
    /// RFC 8693 / RFC 9068: space-separated.
    #[serde(default)]
    scope: Option<String>,
    /// The array form some providers use (Azure AD, Okta).
    #[serde(default)]
    scp: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// The `iss` claim of a token, read without verifying it.
fn unverified_issuer(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Iss>(token)
        .ok()
        .and_then(|c| c.iss)
}

/// RFC 8707 comparison form: scheme and host lower-cased, no trailing slash
/// (the MCP specification asks servers to accept both spellings).
fn canonical(uri: &str) -> String {
    match uri.parse::<Uri>() {
        Ok(parsed) if parsed.scheme().is_some() => format!(
            "{}://{}{}",
            parsed.scheme_str().unwrap_or_default().to_ascii_lowercase(),
            parsed
                .authority()
                .map_or(String::new(), |a| a.as_str().to_ascii_lowercase()),
            parsed
                .path_and_query()
                .map_or("", |p| p.as_str())
                .trim_end_matches('/')
        ),
        _ => uri.to_string(),
    }
}

/// https anywhere, http only to a loopback address (tests, local providers).
fn secure_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    match uri.scheme_str() {
        Some("https") => !host.is_empty(),
        Some("http") => {
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

fn check_url(what: &'static str, url: &str) -> Result<(), OAuthConfigError> {
    // The value goes into a header and a JSON document: no quotes, spaces or fragments.
    let clean = !url.contains(['#', '"', '\\', ' ']) && url.is_ascii();
    if clean && secure_url(url) {
        Ok(())
    } else {
        Err(OAuthConfigError::BadUrl {
            what,
            url: url.to_string(),
        })
    }
}

/// RFC 6749 section 3.3 `scope-token`.
fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

fn http_client() -> HttpClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        // No system roots at all is a host problem; https fetches then fail with it.
        .unwrap_or_else(|_| {
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
        })
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// GETs a JSON document: a 200 within the size and time limits.
async fn fetch_json(http: &HttpClient, url: &str) -> Result<Value, KeysError> {
    let fail = |reason: String| KeysError::Fetch {
        url: url.to_string(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
    let response = tokio::time::timeout(FETCH_TIMEOUT, http.get(uri))
        .await
        .map_err(|_| fail(format!("no answer in {} s", FETCH_TIMEOUT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    if response.status() != StatusCode::OK {
        return Err(fail(format!("status {}", response.status())));
    }
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        Limited::new(response.into_body(), MAX_DOCUMENT_BYTES).collect(),
    )
    .await
    .map_err(|_| fail("the body did not arrive in time".into()))?
    .map_err(|e| fail(format!("body: {e}")))?
    .to_bytes();
    serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))
}

/// The issuer's `jwks_uri`, from the first metadata document that names the
/// issuer exactly (RFC 8414 section 3.3): the OAuth well-known URI with the
/// issuer's path after it, then the OpenID Connect forms.
async fn discover_jwks_uri(http: &HttpClient, issuer: &str) -> Result<String, KeysError> {
    let uri: Uri = issuer.parse().map_err(|e| KeysError::Fetch {
        url: issuer.to_string(),
        reason: format!("{e}"),
    })?;
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map_or("", |a| a.as_str())
    );
    let path = uri.path().trim_end_matches('/');
    let mut candidates = vec![
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
        format!("{origin}/.well-known/openid-configuration{path}"),
    ];
    if !path.is_empty() {
        candidates.push(format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ));
    }
    for url in &candidates {
        match fetch_json(http, url).await {
            Ok(metadata) if metadata["issuer"] == issuer => {
                let jwks_uri = metadata["jwks_uri"].as_str().unwrap_or_default();
                if !secure_url(jwks_uri) {
                    return Err(KeysError::InsecureJwksUri(jwks_uri.to_string()));
                }
                return Ok(jwks_uri.to_string());
            }
            Ok(_) => tracing::debug!(url, "metadata of another issuer"),
            Err(e) => tracing::debug!(url, error = %e, "no issuer metadata here"),
        }
    }
    Err(KeysError::NoMetadata {
        issuer: issuer.to_string(),
        tried: candidates.join(", "),
    })
}

async fn load_keys(
    http: &HttpClient,
    source: &KeySource,
    jwks_uri: Option<&str>,
) -> Result<Vec<VerifyKey>, KeysError> {
    let (document, from) = match (source, jwks_uri) {
        (KeySource::File(path), _) => {
            let text = tokio::fs::read(path)
                .await
                .map_err(|source| KeysError::Read {
                    path: path.clone(),
                    source,
                })?;
            let value = serde_json::from_slice(&text).map_err(|source| KeysError::NotJwks {
                url: path.display().to_string(),
                source,
            })?;
            (value, path.display().to_string())
        }
        (KeySource::Discovered, Some(url)) => (fetch_json(http, url).await?, url.to_string()),
        (KeySource::Discovered, None) => return Err(KeysError::NoUsableKey),
    };
    let set: JwkSet = serde_json::from_value(document)
        .map_err(|source| KeysError::NotJwks { url: from, source })?;
    let keys: Vec<VerifyKey> = set
        .keys
        .iter()
        .filter_map(|jwk| {
            let algorithms = algorithms_for(jwk)?;
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(VerifyKey {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(KeysError::NoUsableKey);
    }
    Ok(keys)
}

/// The signature algorithms a JWK may verify: the one it names, when it is
/// asymmetric, else every one of its key type. Symmetric (`oct`) keys and
/// encryption keys are never used.
fn algorithms_for(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Vec<Algorithm>> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(_) => &[Algorithm::ES256, Algorithm::ES384],
        AlgorithmParameters::OctetKeyPair(_) => &[Algorithm::EdDSA],
        // Symmetric keys (`oct`) and whatever comes next: never.
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(family.to_vec()),
        Some(named) => {
            let named: Algorithm = named.to_string().parse().ok()?;
            family.contains(&named).then(|| vec![named])
        }
    }
}

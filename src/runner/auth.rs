//! Who is calling: Kubernetes ServiceAccount tokens (TokenReview, audience
//! bound) in a cluster; bearer tokens from a file (stored as SHA-256 hashes)
//! or JWTs (HS256/RS256) standalone; OAuth access tokens from configured
//! authorization servers (`oauth.rs`); anonymous only when allowed.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::oauth::{OAuthResource, TokenRejection};

/// The authenticated caller, as CEL rules see it (`caller.sub`, `caller.groups`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub sub: String,
    pub groups: Vec<String>,
    /// How the caller was authenticated, for the audit log.
    pub method: &'static str,
}

impl Caller {
    pub fn anonymous() -> Caller {
        Caller {
            sub: "anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
            method: "anonymous",
        }
    }
}

/// Why a call is unauthenticated. The message is safe to show the caller;
/// [`AuthError::detail`] is for the audit log only.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required (Authorization: Bearer ...)")]
    Missing,
    /// Each way the token was tried, and why it refused the token.
    #[error("the bearer token is not valid")]
    Invalid { rejections: Vec<Rejection> },
    /// A valid access token without every scope the runner requires.
    #[error("the access token lacks scope(s) {}", missing.join(" "))]
    InsufficientScope { missing: Vec<String> },
}

impl AuthError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "TokenMissing",
            AuthError::Invalid { .. } => "TokenInvalid",
            AuthError::InsufficientScope { .. } => "InsufficientScope",
        }
    }

    /// The full reason, for the audit log only.
    pub fn detail(&self) -> String {
        match self {
            AuthError::Missing => "no bearer token".into(),
            AuthError::Invalid { rejections } => rejections
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            AuthError::InsufficientScope { missing } => {
                format!("missing scope(s): {}", missing.join(" "))
            }
        }
    }
}

/// Why one way of authenticating refused a token.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Rejection {
    #[error("the Authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("unknown token")]
    UnknownToken,
    #[error("jwt: the sub claim is empty")]
    JwtEmptySubject,
    #[error("jwt: {0}")]
    Jwt(jsonwebtoken::errors::Error),
    #[error("tokenreview: {0}")]
    TokenReview(ReviewError),
    #[error(transparent)]
    OAuth(Arc<TokenRejection>),
}

impl Rejection {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotBearer => "NotBearer",
            Rejection::UnknownToken => "UnknownToken",
            Rejection::JwtEmptySubject => "JwtEmptySubject",
            Rejection::Jwt(_) => "JwtInvalid",
            Rejection::TokenReview(e) => e.reason(),
            Rejection::OAuth(e) => e.reason(),
        }
    }
}

/// Why a TokenReview did not authenticate a token.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReviewError {
    /// Shared: answers are cached, and `kube::Error` cannot be cloned.
    #[error("{0}")]
    Request(Arc<kube::Error>),
    #[error("no status in the TokenReview response")]
    NoStatus,
    /// With the API server's own words, when it gave some.
    #[error("{}", .0.as_deref().unwrap_or("not authenticated"))]
    NotAuthenticated(Option<String>),
    #[error("the token is not bound to audience {0}")]
    WrongAudience(String),
    #[error("no user in the TokenReview status")]
    NoUser,
}

impl ReviewError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            ReviewError::Request(_) => "TokenReviewFailed",
            ReviewError::NoStatus | ReviewError::NoUser => "TokenReviewIncomplete",
            ReviewError::NotAuthenticated(_) => "TokenReviewRefused",
            ReviewError::WrongAudience(_) => "TokenWrongAudience",
        }
    }
}

/// A line of a token file that is not `SHA256HEX SUBJECT [GROUPS]`.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("line {line}: expected `SHA256HEX SUBJECT [GROUPS]`")]
    MissingField { line: usize },
    /// `start`: the first 8 characters only (the line may hold a real token).
    #[error("line {line}: `{start}...` is not a SHA-256 hex digest (store hashes, not tokens)")]
    NotADigest { line: usize, start: String },
}

/// A bearer-token file: one `SHA256HEX SUBJECT [GROUP,GROUP...]` per line,
/// `#` comments. Only hashes are stored, so the file leaks no usable token.
/// Make a line with `printf %s "$TOKEN" | sha256sum`.
pub fn parse_token_file(
    text: &str,
) -> Result<HashMap<String, (String, Vec<String>)>, TokenFileError> {
    let mut tokens = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(hash), Some(sub)) = (parts.next(), parts.next()) else {
            return Err(TokenFileError::MissingField { line: i + 1 });
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFileError::NotADigest {
                line: i + 1,
                start: hash.chars().take(8).collect(),
            });
        }
        let groups = parts
            .next()
            .map(|g| {
                g.split(',')
                    .filter(|g| !g.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        tokens.insert(hash.to_ascii_lowercase(), (sub.to_string(), groups));
    }
    Ok(tokens)
}

/// Shortest HS256 secret accepted: RFC 7518 (3.2) requires a key at least as
/// long as the hash output; a shorter one can be guessed, an empty one forged.
pub const MIN_HS256_KEY_BYTES: usize = 32;

/// Clock skew allowed on `exp` and `nbf`.
const JWT_LEEWAY_SECS: u64 = 30;

/// Why an authentication setting cannot be used; `serve` refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: an HS256 key must be at least {MIN_HS256_KEY_BYTES} bytes, this one has {len} \
         (make one with `head -c 32 /dev/urandom | base64 > FILE`)",
        path.display()
    )]
    WeakHs256Key { path: PathBuf, len: usize },
    #[error("{}: not an RSA public key in PEM: {source}", path.display())]
    NotRsaPem {
        path: PathBuf,
        source: jsonwebtoken::errors::Error,
    },
    #[error("unsupported JWT algorithm {0:?}")]
    UnsupportedAlgorithm(Algorithm),
    #[error("{}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: TokenFileError,
    },
    #[error(
        "{}: holds no tokens; every call would be refused (add `SHA256HEX SUBJECT` lines)",
        path.display()
    )]
    NoTokens { path: PathBuf },
    #[error(
        "JWT keys are configured without --jwt-audience: tokens minted for any other service \
         would be accepted; set --jwt-audience, or pass --jwt-any-audience to accept that"
    )]
    NoAudience,
}

impl AuthConfigError {
    /// Stable CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthConfigError::Read { .. } => "Unreadable",
            AuthConfigError::WeakHs256Key { .. } => "WeakHs256Key",
            AuthConfigError::NotRsaPem { .. } => "NotRsaPem",
            AuthConfigError::UnsupportedAlgorithm(_) => "UnsupportedAlgorithm",
            AuthConfigError::TokenFile { .. } => "InvalidTokenFile",
            AuthConfigError::NoTokens { .. } => "NoTokens",
            AuthConfigError::NoAudience => "NoAudience",
        }
    }
}

/// Reads a `--tokens` file; a file without any token is an error (it would
/// silently refuse everyone, or leave anonymous access on).
pub fn load_token_file(
    path: &Path,
) -> Result<HashMap<String, (String, Vec<String>)>, AuthConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
        path: path.into(),
        source,
    })?;
    let tokens = parse_token_file(&text).map_err(|source| AuthConfigError::TokenFile {
        path: path.into(),
        source,
    })?;
    if tokens.is_empty() {
        return Err(AuthConfigError::NoTokens { path: path.into() });
    }
    Ok(tokens)
}

/// A JWT verification key with its algorithm.
pub struct JwtKey {
    key: DecodingKey,
    validation: Validation,
}

impl JwtKey {
    /// `HS256` with a shared secret (the file's bytes, trailing newline dropped,
    /// at least [`MIN_HS256_KEY_BYTES`]) or `RS256` with a PEM public key.
    /// `exp` and `sub` are required and `nbf` is honoured; `aud` and `iss` are
    /// required and checked when given.
    pub fn from_file(
        algorithm: Algorithm,
        path: &Path,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<JwtKey, AuthConfigError> {
        let bytes = std::fs::read(path).map_err(|source| AuthConfigError::Read {
            path: path.into(),
            source,
        })?;
        let key = match algorithm {
            Algorithm::HS256 => {
                let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                if secret.len() < MIN_HS256_KEY_BYTES {
                    return Err(AuthConfigError::WeakHs256Key {
                        path: path.into(),
                        len: secret.len(),
                    });
                }
                DecodingKey::from_secret(secret)
            }
            Algorithm::RS256 => {
                DecodingKey::from_rsa_pem(&bytes).map_err(|source| AuthConfigError::NotRsaPem {
                    path: path.into(),
                    source,
                })?
            }
            other => return Err(AuthConfigError::UnsupportedAlgorithm(other)),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(JwtKey { key, validation })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Read only to refuse a list: `iss` is one issuer (RFC 7519 4.1.1), and
    /// jsonwebtoken would accept `["other", "ours"]` as issued by us.
    #[serde(default, rename = "iss")]
    _issuer: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// How long a TokenReview answer is reused: accepted tokens a minute (the API
/// server's own webhook cache keeps them two), refused ones a few seconds so a
/// token that just became valid is not refused for long.
const REVIEW_ACCEPTED_TTL: Duration = Duration::from_secs(60);
const REVIEW_REFUSED_TTL: Duration = Duration::from_secs(5);
/// Distinct tokens remembered, accepted and refused ones each; the least
/// recently used is forgotten first.
const REVIEW_CACHE_ENTRIES: usize = 4096;
/// TokenReviews in flight at once: a flood of fresh tokens queues here
/// instead of hammering the API server.
const REVIEWS_IN_FLIGHT: usize = 16;

type ReviewCache = lru::LruCache<[u8; 32], (Result<Caller, ReviewError>, Instant)>;

/// In-cluster authentication through the API server's TokenReview, with
/// answers cached by the token's SHA-256 (never the token itself). Accepted
/// and refused answers are kept apart, so a flood of made-up tokens cannot
/// push the real callers' answers out and make each of them wait for a new
/// review behind the flood.
pub struct TokenReviewer {
    client: kube::Client,
    /// The runner's audience: tokens minted for anything else are rejected.
    audience: String,
    accepted: Mutex<ReviewCache>,
    refused: Mutex<ReviewCache>,
    in_flight: tokio::sync::Semaphore,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: String) -> TokenReviewer {
        TokenReviewer::with_cache_entries(client, audience, REVIEW_CACHE_ENTRIES)
    }

    fn with_cache_entries(client: kube::Client, audience: String, entries: usize) -> TokenReviewer {
        let cache = || {
            Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN),
            ))
        };
        TokenReviewer {
            client,
            audience,
            accepted: cache(),
            refused: cache(),
            in_flight: tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT),
        }
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Result<Caller, ReviewError>> {
        [&self.accepted, &self.refused]
            .into_iter()
            .find_map(|cache| {
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                match cache.get(digest) {
                    Some((answer, expires)) if *expires > Instant::now() => Some(answer.clone()),
                    Some(_) => {
                        cache.pop(digest);
                        None
                    }
                    None => None,
                }
            })
    }

    /// The API server's verdict on `token`, from the cache when fresh.
    async fn review(&self, token: &str) -> Result<Caller, ReviewError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.cached(&digest) {
            return answer;
        }
        // Closed only on drop; a failed acquire cannot happen while `self` lives.
        let _permit = self.in_flight.acquire().await;
        if let Some(answer) = self.cached(&digest) {
            return answer; // reviewed while this call waited
        }
        let answer = review(self, token).await;
        let (cache, ttl) = if answer.is_ok() {
            (&self.accepted, REVIEW_ACCEPTED_TTL)
        } else {
            (&self.refused, REVIEW_REFUSED_TTL)
        };
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(digest, (answer.clone(), Instant::now() + ttl));
        answer
    }
}

/// Every configured way to authenticate, tried in a fixed order.
#[derive(Default)]
pub struct Authenticator {
    pub tokens: HashMap<String, (String, Vec<String>)>,
    pub jwt_keys: Vec<JwtKey>,
    pub token_review: Option<TokenReviewer>,
    /// Access tokens of OAuth authorization servers, for this resource only.
    pub oauth: Option<OAuthResource>,
    pub allow_anonymous: bool,
}

impl Authenticator {
    /// Short description for the startup banner.
    pub fn describe(&self) -> String {
        let mut ways = Vec::new();
        if self.token_review.is_some() {
            ways.push("Kubernetes TokenReview".to_string());
        }
        if !self.tokens.is_empty() {
            ways.push(format!("{} bearer token(s)", self.tokens.len()));
        }
        if !self.jwt_keys.is_empty() {
            ways.push(format!("JWT ({} key(s))", self.jwt_keys.len()));
        }
        if let Some(oauth) = &self.oauth {
            ways.push(oauth.describe());
        }
        if self.allow_anonymous {
            ways.push("ANONYMOUS allowed".to_string());
        }
        if ways.is_empty() {
            "none (every call is refused)".into()
        } else {
            ways.join(", ")
        }
    }

    /// `authorization` is the raw `Authorization` header, if any.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let Some(header) = authorization else {
            return if self.allow_anonymous {
                Ok(Caller::anonymous())
            } else {
                Err(AuthError::Missing)
            };
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::Invalid {
                rejections: vec![Rejection::NotBearer],
            })?;
        let digest = hex::encode(Sha256::digest(token.as_bytes()));
        if let Some((sub, groups)) = self.tokens.get(&digest) {
            return Ok(Caller {
                sub: sub.clone(),
                groups: groups.clone(),
                method: "token",
            });
        }
        let mut rejections = Vec::new();
        if let Some(oauth) = &self.oauth
            && oauth.claims_issuer(token)
        {
            return match oauth.verify(token).await {
                Ok(verified) => {
                    let missing: Vec<String> = oauth
                        .required_scopes()
                        .iter()
                        .filter(|s| !verified.scopes.contains(s))
                        .cloned()
                        .collect();
                    if !missing.is_empty() {
                        return Err(AuthError::InsufficientScope { missing });
                    }
                    Ok(Caller {
                        sub: verified.sub,
                        groups: verified.groups,
                        method: "oauth",
                    })
                }
                Err(e) => Err(AuthError::Invalid {
                    rejections: vec![Rejection::OAuth(Arc::new(e))],
                }),
            };
        }
        if token.matches('.').count() == 2 {
            for key in &self.jwt_keys {
                match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                    Ok(data) if data.claims.sub.is_empty() => {
                        rejections.push(Rejection::JwtEmptySubject);
                    }
                    Ok(data) => {
                        return Ok(Caller {
                            sub: data.claims.sub,
                            groups: data.claims.groups,
                            method: "jwt",
                        });
                    }
                    Err(e) => rejections.push(Rejection::Jwt(e)),
                }
            }
        }
        if let Some(reviewer) = &self.token_review {
            match reviewer.review(token).await {
                Ok(caller) => return Ok(caller),
                Err(e) => rejections.push(Rejection::TokenReview(e)),
            }
        }
        if rejections.is_empty() {
            rejections.push(Rejection::UnknownToken);
        }
        Err(AuthError::Invalid { rejections })
    }
}

async fn review(reviewer: &TokenReviewer, token: &str) -> Result<Caller, ReviewError> {
    let api: kube::Api<TokenReview> = kube::Api::all(reviewer.client.clone());
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![reviewer.audience.clone()]),
        },
        ..TokenReview::default()
    };
    let response = api
        .create(&kube::api::PostParams::default(), &request)
        .await
        .map_err(|e| ReviewError::Request(Arc::new(e)))?;
    let status = response.status.ok_or(ReviewError::NoStatus)?;
    if status.authenticated != Some(true) {
        return Err(ReviewError::NotAuthenticated(status.error));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .contains(&reviewer.audience)
    {
        return Err(ReviewError::WrongAudience(reviewer.audience.clone()));
    }
    let user = status.user.ok_or(ReviewError::NoUser)?;
    // An empty name would be a caller every rule's `caller.sub` check misreads.
    let sub = user
        .username
        .filter(|name| !name.is_empty())
        .ok_or(ReviewError::NoUser)?;
    Ok(Caller {
        sub,
        groups: user.groups.unwrap_or_default(),
        method: "serviceaccount",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn hash(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn hashed_bearer_tokens_authenticate_and_others_do_not() {
        let file = format!(
            "# agents\n{} alice admins,devs\n{} bob\n",
            hash("s3cret"),
            hash("other")
        );
        let auth = Authenticator {
            tokens: parse_token_file(&file).unwrap(),
            ..Default::default()
        };
        let alice = block_on(auth.authenticate(Some("Bearer s3cret"))).unwrap();
        assert_eq!((alice.sub.as_str(), alice.groups.len()), ("alice", 2));
        assert!(matches!(
            block_on(auth.authenticate(Some("Bearer nope"))),
            Err(AuthError::Invalid { .. })
        ));
        let missing = block_on(auth.authenticate(None)).unwrap_err();
        assert_eq!(missing.reason(), "TokenMissing");
        assert!(block_on(auth.authenticate(Some("Basic czNjcmV0"))).is_err());
    }

    #[test]
    fn token_files_must_hold_hashes() {
        let e = parse_token_file("s3cret-token-value alice").unwrap_err();
        assert!(
            matches!(&e, TokenFileError::NotADigest { line: 1, start } if start == "s3cret-t"),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("line 1: `s3cret-t...`"), "{e}");
    }

    #[test]
    fn anonymous_only_when_allowed() {
        let auth = Authenticator {
            allow_anonymous: true,
            ..Default::default()
        };
        assert_eq!(
            block_on(auth.authenticate(None)).unwrap(),
            Caller::anonymous()
        );
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn hs256_signed(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(KEY.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn short_and_empty_hs256_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        for weak in ["", "\n", "short-secret\n", &KEY[1..]] {
            std::fs::write(&path, weak).unwrap();
            let Err(e) = JwtKey::from_file(Algorithm::HS256, &path, Some("a"), None) else {
                panic!("{weak:?} accepted");
            };
            assert_eq!(e.reason(), "WeakHs256Key", "{e}");
            assert!(e.to_string().contains("at least 32 bytes"), "{e}");
        }
        std::fs::write(&path, KEY).unwrap();
        JwtKey::from_file(Algorithm::HS256, &path, Some("a"), None).unwrap();
    }

    #[test]
    fn tokens_that_omit_required_claims_or_are_not_yet_valid_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, KEY).unwrap();
        let auth = Authenticator {
            jwt_keys: vec![
                JwtKey::from_file(Algorithm::HS256, &path, Some("toolwarden"), Some("idp"))
                    .unwrap(),
            ],
            ..Default::default()
        };
        let now = jiff::Timestamp::now().as_second();
        let full = serde_json::json!({"sub": "eve", "aud": "toolwarden", "iss": "idp",
                                      "exp": now + 600, "nbf": now - 10});
        let check = |claims: &serde_json::Value| {
            block_on(auth.authenticate(Some(&format!("Bearer {}", hs256_signed(claims)))))
        };
        assert_eq!(check(&full).unwrap().sub, "eve");
        let mut claims = full.clone();
        claims["sub"] = "".into();
        assert!(check(&claims).is_err(), "an empty subject was accepted");
        for missing in ["aud", "iss", "exp", "sub"] {
            let mut claims = full.clone();
            claims.as_object_mut().unwrap().remove(missing);
            let Err(e @ AuthError::Invalid { .. }) = check(&claims) else {
                panic!("a token without {missing} was accepted");
            };
            assert_eq!(e.reason(), "TokenInvalid");
            assert!(e.detail().contains(missing), "{missing}: {}", e.detail());
        }
        for (claim, value) in [
            ("nbf", serde_json::json!(now + 600)),
            // Just past the allowed clock skew.
            ("nbf", serde_json::json!(now + JWT_LEEWAY_SECS as i64 + 5)),
            ("aud", serde_json::json!(["other"])),
            ("aud", serde_json::json!([])),
            ("aud", serde_json::json!(["toolwarden-other", "other"])),
            ("aud", serde_json::json!("TOOLWARDEN")),
            ("iss", serde_json::json!(["idp"])),
            ("iss", serde_json::json!("other-idp")),
            ("exp", serde_json::json!(now - 600)),
        ] {
            let mut claims = full.clone();
            claims[claim] = value.clone();
            assert!(check(&claims).is_err(), "{claim} = {value} not checked");
        }
        // An audience list naming this runner among others is for this runner (RFC 7519 4.1.3).
        let mut claims = full.clone();
        claims["aud"] = serde_json::json!(["other", "toolwarden"]);
        assert_eq!(check(&claims).unwrap().sub, "eve");
    }

    #[test]
    fn token_files_without_tokens_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        for empty in ["", "\n", "# only a comment\n\n"] {
            std::fs::write(&path, empty).unwrap();
            let e = load_token_file(&path).unwrap_err();
            assert_eq!(e.reason(), "NoTokens", "{e}");
        }
        std::fs::write(&path, format!("{} alice\n", hash("t"))).unwrap();
        assert_eq!(load_token_file(&path).unwrap().len(), 1);
    }

    /// A fake API server on loopback that answers TokenReviews and counts them.
    async fn fake_api_server(
        reviews: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> kube::Client {
        use axum::routing::post;
        let app = axum::Router::new().route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(move |axum::Json(review): axum::Json<serde_json::Value>| {
                reviews.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let token = &review["spec"]["token"];
                let good = token == "good-token" || token == "nameless-token";
                let user = match token == "nameless-token" {
                    true => serde_json::json!({"username": ""}),
                    false => serde_json::json!({"username": "system:serviceaccount:agents:bot"}),
                };
                async move {
                    axum::Json(serde_json::json!({
                        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "status": {"authenticated": good, "audiences": ["toolwarden"],
                                   "user": user}
                    }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
    }

    #[tokio::test]
    async fn token_reviews_are_cached_by_digest_and_a_flood_of_one_token_costs_one_review() {
        let reviews = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = fake_api_server(reviews.clone()).await;
        let auth = Authenticator {
            token_review: Some(TokenReviewer::new(client, "toolwarden".into())),
            ..Default::default()
        };
        for _ in 0..50 {
            let caller = auth.authenticate(Some("Bearer good-token")).await.unwrap();
            assert_eq!(caller.sub, "system:serviceaccount:agents:bot");
            assert!(auth.authenticate(Some("Bearer forged")).await.is_err());
            // Authenticated, but as nobody: refused, not a caller with an empty name.
            let nameless = auth.authenticate(Some("Bearer nameless-token")).await;
            let Err(AuthError::Invalid { rejections }) = nameless else {
                panic!("a nameless caller was accepted: {nameless:?}");
            };
            assert_eq!(rejections[0].reason(), "TokenReviewIncomplete");
        }
        assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 3);
        let reviewer = auth.token_review.as_ref().unwrap();
        let cache = reviewer.refused.lock().unwrap();
        let forged: [u8; 32] = Sha256::digest(b"forged").into();
        let (answer, expires) = cache.peek(&forged).unwrap();
        assert!(answer.is_err() && *expires <= Instant::now() + REVIEW_REFUSED_TTL);
    }

    /// The eviction attack: more made-up tokens than the cache holds, sent
    /// between a real caller's calls. The real caller's answer stays cached.
    #[tokio::test]
    async fn a_flood_of_made_up_tokens_cannot_push_out_a_real_callers_review() {
        use std::sync::atomic::Ordering::SeqCst;
        let reviews = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = fake_api_server(reviews.clone()).await;
        let auth = Authenticator {
            token_review: Some(TokenReviewer::with_cache_entries(
                client,
                "toolwarden".into(),
                8,
            )),
            ..Default::default()
        };
        auth.authenticate(Some("Bearer good-token")).await.unwrap();
        for i in 0..40 {
            let forged = format!("Bearer forged-{i}");
            assert!(auth.authenticate(Some(&forged)).await.is_err());
        }
        assert_eq!(reviews.load(SeqCst), 41);
        auth.authenticate(Some("Bearer good-token")).await.unwrap();
        assert_eq!(
            reviews.load(SeqCst),
            41,
            "the real caller was reviewed again"
        );
    }

    #[test]
    fn hs256_jwts_with_audience() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key");
        std::fs::write(&key_path, format!("{KEY}\n")).unwrap();
        let auth = Authenticator {
            jwt_keys: vec![
                JwtKey::from_file(Algorithm::HS256, &key_path, Some("toolwarden"), None).unwrap(),
            ],
            ..Default::default()
        };
        let exp = jiff::Timestamp::now().as_second() + 600;
        let sign = |aud: &str, secret: &[u8]| {
            let claims =
                serde_json::json!({"sub": "carol", "groups": ["admins"], "aud": aud, "exp": exp});
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        let good = block_on(auth.authenticate(Some(&format!(
            "Bearer {}",
            sign("toolwarden", KEY.as_bytes())
        ))))
        .unwrap();
        assert_eq!((good.sub.as_str(), good.method), ("carol", "jwt"));
        for bad in [
            sign("other", KEY.as_bytes()),
            sign("toolwarden", b"wrong-key"),
        ] {
            assert!(block_on(auth.authenticate(Some(&format!("Bearer {bad}")))).is_err());
        }
    }

    #[test]
    fn rs256_jwts_and_the_algorithm_confusion_attack() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let public = fixtures.join("test-only-rs256-public.pem");
        let private = std::fs::read(fixtures.join("test-only-rs256-private.pem")).unwrap();
        let auth = Authenticator {
            jwt_keys: vec![
                JwtKey::from_file(Algorithm::RS256, &public, None, Some("issuer")).unwrap(),
            ],
            ..Default::default()
        };
        let claims = serde_json::json!({"sub": "dave", "iss": "issuer",
                                        "exp": jiff::Timestamp::now().as_second() + 600});
        let good = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&private).unwrap(),
        )
        .unwrap();
        let caller = block_on(auth.authenticate(Some(&format!("Bearer {good}")))).unwrap();
        assert_eq!(caller.sub, "dave");
        // HS256 "signed" with the public key as the shared secret must not pass.
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
        )
        .unwrap();
        assert!(block_on(auth.authenticate(Some(&format!("Bearer {forged}")))).is_err());
        let expired = serde_json::json!({"sub": "dave", "iss": "issuer", "exp": 1});
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &expired,
            &EncodingKey::from_rsa_pem(&private).unwrap(),
        )
        .unwrap();
        assert!(block_on(auth.authenticate(Some(&format!("Bearer {old}")))).is_err());
    }
}

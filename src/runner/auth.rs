//! Who is calling: Kubernetes ServiceAccount tokens (TokenReview, audience
//! bound) in a cluster; bearer tokens from a file (stored as SHA-256 hashes)
//! or JWTs (HS256/RS256) standalone; anonymous only when allowed.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use serde::Deserialize;
use sha2::{Digest, Sha256};

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

/// Why a call is unauthenticated. The message is safe to show the caller.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required (Authorization: Bearer ...)")]
    Missing,
    #[error("the bearer token is not valid")]
    Invalid { reason: String },
}

impl AuthError {
    /// The full reason, for the audit log only.
    pub fn reason(&self) -> String {
        match self {
            AuthError::Missing => "no bearer token".into(),
            AuthError::Invalid { reason } => reason.clone(),
        }
    }
}

/// A bearer-token file: one `SHA256HEX SUBJECT [GROUP,GROUP...]` per line,
/// `#` comments. Only hashes are stored, so the file leaks no usable token.
/// Make a line with `printf %s "$TOKEN" | sha256sum`.
pub fn parse_token_file(text: &str) -> Result<HashMap<String, (String, Vec<String>)>, String> {
    let mut tokens = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(hash), Some(sub)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "line {}: expected `SHA256HEX SUBJECT [GROUPS]`",
                i + 1
            ));
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "line {}: `{hash:.8}...` is not a SHA-256 hex digest (store hashes, not tokens)",
                i + 1
            ));
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

/// A JWT verification key with its algorithm.
pub struct JwtKey {
    key: DecodingKey,
    validation: Validation,
}

impl JwtKey {
    /// `HS256` with a shared secret (the file's bytes, trailing newline dropped)
    /// or `RS256` with a PEM public key. `aud`/`iss` are checked when given.
    pub fn from_file(
        algorithm: Algorithm,
        path: &Path,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<JwtKey, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let key = match algorithm {
            Algorithm::HS256 => {
                DecodingKey::from_secret(bytes.strip_suffix(b"\n").unwrap_or(&bytes))
            }
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&bytes)
                .map_err(|e| format!("{}: not an RSA public key in PEM: {e}", path.display()))?,
            other => return Err(format!("unsupported JWT algorithm {other:?}")),
        };
        let mut validation = Validation::new(algorithm);
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(JwtKey { key, validation })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// In-cluster authentication through the API server's TokenReview.
pub struct TokenReviewer {
    pub client: kube::Client,
    /// The runner's audience: tokens minted for anything else are rejected.
    pub audience: String,
}

/// Every configured way to authenticate, tried in a fixed order.
#[derive(Default)]
pub struct Authenticator {
    pub tokens: HashMap<String, (String, Vec<String>)>,
    pub jwt_keys: Vec<JwtKey>,
    pub token_review: Option<TokenReviewer>,
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
                reason: "the Authorization header is not `Bearer <token>`".into(),
            })?;
        let digest = hex::encode(Sha256::digest(token.as_bytes()));
        if let Some((sub, groups)) = self.tokens.get(&digest) {
            return Ok(Caller {
                sub: sub.clone(),
                groups: groups.clone(),
                method: "token",
            });
        }
        let mut reasons = Vec::new();
        if token.matches('.').count() == 2 {
            for key in &self.jwt_keys {
                match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                    Ok(data) => {
                        return Ok(Caller {
                            sub: data.claims.sub,
                            groups: data.claims.groups,
                            method: "jwt",
                        });
                    }
                    Err(e) => reasons.push(format!("jwt: {e}")),
                }
            }
        }
        if let Some(reviewer) = &self.token_review {
            match review(reviewer, token).await {
                Ok(caller) => return Ok(caller),
                Err(e) => reasons.push(format!("tokenreview: {e}")),
            }
        }
        if reasons.is_empty() {
            reasons.push("unknown token".into());
        }
        Err(AuthError::Invalid {
            reason: reasons.join("; "),
        })
    }
}

async fn review(reviewer: &TokenReviewer, token: &str) -> Result<Caller, String> {
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
        .map_err(|e| e.to_string())?;
    let status = response
        .status
        .ok_or("no status in the TokenReview response")?;
    if status.authenticated != Some(true) {
        return Err(status.error.unwrap_or_else(|| "not authenticated".into()));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .contains(&reviewer.audience)
    {
        return Err(format!(
            "the token is not bound to audience {}",
            reviewer.audience
        ));
    }
    let user = status.user.ok_or("no user in the TokenReview status")?;
    Ok(Caller {
        sub: user.username.unwrap_or_default(),
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
        assert_eq!(block_on(auth.authenticate(None)), Err(AuthError::Missing));
        assert!(block_on(auth.authenticate(Some("Basic czNjcmV0"))).is_err());
    }

    #[test]
    fn token_files_must_hold_hashes() {
        assert!(
            parse_token_file("s3cret alice")
                .unwrap_err()
                .contains("line 1")
        );
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

    #[test]
    fn hs256_jwts_with_audience() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key");
        std::fs::write(&key_path, "shared-key\n").unwrap();
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
            sign("toolwarden", b"shared-key")
        ))))
        .unwrap();
        assert_eq!((good.sub.as_str(), good.method), ("carol", "jwt"));
        for bad in [
            sign("other", b"shared-key"),
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

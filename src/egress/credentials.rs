//! Credentials by placeholder. The sandbox gets `twph_<32 hex>` instead of a
//! secret's value; the proxy swaps the value in only where the secret's
//! `inject` says (its host, path prefix, header and `prefix` format), and
//! refuses a request that carries a placeholder anywhere else.
//!
//! A placeholder is worthless outside this proxy (it is random per call and
//! maps to nothing elsewhere), so finding one in the wrong place is not what
//! protects the secret; it is evidence that the tool tried to send its
//! credential somewhere it should not, and it is audited as such.

use std::fmt;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::error::EgressError;
use super::policy::{HostPattern, is_plain_path, path_under};
use crate::api::SecretUse;

/// What every placeholder starts with, so they are recognisable in logs.
pub const PLACEHOLDER_PREFIX: &str = "twph_";

#[derive(Clone)]
struct Credential {
    /// `secretName/key`, named in audit records; never the value.
    secret: String,
    placeholder: String,
    host: HostPattern,
    header: HeaderName,
    /// `prefix + placeholder`: the exact header value the tool must send.
    expected: Vec<u8>,
    path_prefix: Option<String>,
    /// `prefix + value`, marked sensitive (hyper never logs it).
    real: HeaderValue,
}

/// One call's injected secrets.
#[derive(Clone, Default)]
pub struct Credentials {
    entries: Arc<Vec<Credential>>,
    /// Finds any of this call's placeholders; `None` without credentials.
    finder: Option<Arc<AhoCorasick>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|c| &c.secret))
            .finish()
    }
}

/// Where a request put its credentials, and which were swapped in.
pub(crate) struct Injected {
    /// `secretName/key` of each credential added.
    pub secrets: Vec<String>,
}

impl Credentials {
    /// Issues a fresh placeholder for `secret` (which must have `inject`)
    /// whose real value is `value`; leading and trailing white space of the
    /// value is dropped (Secret files often end in a newline). Returns the
    /// placeholder the sandbox is given instead of the value.
    pub fn issue(&mut self, secret: &SecretUse, value: &[u8]) -> Result<String, EgressError> {
        let name = format!("{}/{}", secret.secret_name, secret.key);
        let invalid = |detail: String| EgressError::InvalidCredential {
            secret: name.clone(),
            detail,
        };
        let inject = secret
            .inject
            .as_ref()
            .ok_or_else(|| invalid("the secret is not delivered with `inject`".into()))?;
        let header = HeaderName::from_bytes(inject.header.as_bytes())
            .map_err(|_| invalid(format!("`{}` is not a header name", inject.header)))?;
        let path_prefix = inject.path_prefix.as_ref().map(|p| p.0.clone());
        if let Some(bad) = path_prefix.as_deref().filter(|p| !is_plain_path(p)) {
            return Err(invalid(format!("`{bad}` is not a plain absolute path")));
        }
        let format_prefix = inject.prefix.clone().unwrap_or_default();
        let mut real = format_prefix.clone().into_bytes();
        real.extend_from_slice(value.trim_ascii());
        let mut real = HeaderValue::from_bytes(&real).map_err(|_| {
            invalid("the value (with its prefix) is not a valid header value".into())
        })?;
        real.set_sensitive(true);
        let placeholder = new_placeholder()?;
        let mut entries: Vec<Credential> = self.entries.iter().cloned().collect();
        entries.push(Credential {
            secret: name.clone(),
            host: HostPattern::parse(&inject.host)
                .map_err(|_| invalid(format!("`{}` is not a host name", inject.host)))?,
            header,
            expected: format!("{format_prefix}{placeholder}").into_bytes(),
            path_prefix,
            real,
            placeholder: placeholder.clone(),
        });
        let finder = AhoCorasick::new(entries.iter().map(|c| &c.placeholder))
            .map_err(|e| invalid(format!("placeholder index: {e}")))?;
        self.entries = Arc::new(entries);
        self.finder = Some(Arc::new(finder));
        Ok(placeholder)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The credential whose placeholder occurs in `haystack`, if any.
    fn find(&self, haystack: &[u8]) -> Option<&Credential> {
        let found = self.finder.as_ref()?.find(haystack)?;
        self.entries.get(found.pattern().as_usize())
    }

    /// Refuses a placeholder in `haystack`, which no credential may be in.
    pub(crate) fn refuse_in(&self, haystack: &[u8], place: &str) -> Result<(), EgressError> {
        match self.find(haystack) {
            Some(credential) => Err(misuse(credential, place)),
            None => Ok(()),
        }
    }

    /// Swaps the real values into `headers` of a request to `host` (canonical)
    /// and `path`, and refuses placeholders anywhere else in them.
    pub(crate) fn inject(
        &self,
        host: &str,
        path: &str,
        headers: &mut HeaderMap,
    ) -> Result<Injected, EgressError> {
        let mut injected = Injected {
            secrets: Vec::new(),
        };
        if self.entries.is_empty() {
            return Ok(injected);
        }
        let mut rewritten = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers.iter() {
            self.refuse_in(name.as_str().as_bytes(), "a header name")?;
            let Some(credential) = self.find(value.as_bytes()) else {
                rewritten.append(name.clone(), value.clone());
                continue;
            };
            let applies = credential.host.matches(host)
                && credential
                    .path_prefix
                    .as_deref()
                    .is_none_or(|prefix| path_under(path, prefix));
            if !applies {
                return Err(misuse(
                    credential,
                    &format!("header `{name}` to {host}{path}"),
                ));
            }
            if *name != credential.header || value.as_bytes() != credential.expected {
                return Err(misuse(
                    credential,
                    &format!(
                        "header `{name}` (not exactly the declared `{}`)",
                        credential.header
                    ),
                ));
            }
            if injected.secrets.contains(&credential.secret) {
                return Err(misuse(credential, &format!("a repeated header `{name}`")));
            }
            rewritten.append(name.clone(), credential.real.clone());
            injected.secrets.push(credential.secret.clone());
        }
        *headers = rewritten;
        Ok(injected)
    }
}

fn misuse(credential: &Credential, place: &str) -> EgressError {
    EgressError::CredentialMisuse {
        secret: credential.secret.clone(),
        place: place.to_string(),
    }
}

/// 128 random bits from the operating system, hex-encoded.
fn new_placeholder() -> Result<String, EgressError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| EgressError::Random {
        detail: e.to_string(),
    })?;
    Ok(format!("{PLACEHOLDER_PREFIX}{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EgressPath, SecretInjection};

    fn secret(host: &str, header: &str, prefix: Option<&str>, path: Option<&str>) -> SecretUse {
        SecretUse {
            secret_name: "keys".into(),
            key: "k".into(),
            env: None,
            file: None,
            inject: Some(SecretInjection {
                host: host.into(),
                header: header.into(),
                prefix: prefix.map(Into::into),
                path_prefix: path.map(|p| EgressPath(p.into())),
                placeholder_env: None,
            }),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn placeholders_are_random_and_opaque() {
        let mut creds = Credentials::default();
        let a = creds
            .issue(&secret("api.test", "X-Key", None, None), b"real")
            .unwrap();
        let b = creds
            .issue(&secret("api.test", "X-Other", None, None), b"real")
            .unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(PLACEHOLDER_PREFIX) && a.len() == 5 + 32);
        assert!(!a.contains("real") && !format!("{creds:?}").contains("real"));
    }

    #[test]
    fn the_value_goes_only_into_the_declared_header_format_host_and_path() {
        let mut creds = Credentials::default();
        let ph = creds
            .issue(
                &secret("api.test", "Authorization", Some("Bearer "), Some("/v1")),
                b"s3cret\n",
            )
            .unwrap();
        let bearer = format!("Bearer {ph}");
        let mut ok = headers(&[("authorization", &bearer), ("accept", "*/*")]);
        let done = creds.inject("api.test", "/v1/items", &mut ok).unwrap();
        assert_eq!(done.secrets, vec!["keys/k".to_string()]);
        assert_eq!(ok["authorization"], "Bearer s3cret");
        assert_eq!(ok["accept"], "*/*");

        for (host, path, pairs) in [
            (
                "other.test",
                "/v1",
                vec![("authorization", bearer.as_str())],
            ),
            ("api.test", "/v2", vec![("authorization", bearer.as_str())]),
            ("api.test", "/v1x", vec![("authorization", bearer.as_str())]),
            ("api.test", "/v1", vec![("x-leak", bearer.as_str())]),
            ("api.test", "/v1", vec![("authorization", ph.as_str())]),
            (
                "api.test",
                "/v1",
                vec![("authorization", &format!("Basic {ph}"))],
            ),
            (
                "api.test",
                "/v1",
                vec![
                    ("authorization", bearer.as_str()),
                    ("authorization", bearer.as_str()),
                ],
            ),
            ("api.test", "/v1", vec![(ph.as_str(), "x")]),
        ] {
            let mut h = headers(&pairs);
            let err = creds.inject(host, path, &mut h).err();
            assert_eq!(
                err.as_ref().map(EgressError::reason),
                Some("CredentialMisuse"),
                "{host}{path} {pairs:?}"
            );
        }
    }

    #[test]
    fn a_value_that_is_no_header_value_is_refused_at_issue() {
        let err = Credentials::default()
            .issue(&secret("api.test", "X-Key", None, None), b"a\nb")
            .unwrap_err();
        assert_eq!(err.reason(), "InvalidCredential");
        assert!(!err.to_string().contains("a\nb"));
    }
}

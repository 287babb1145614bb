//! What one sandbox may reach: the tool's `permissions.network.egress` rules,
//! the address ranges its ToolPolicies allow, limits, and this call's
//! credentials.

use std::time::Duration;

use ipnet::IpNet;

use super::credentials::Credentials;
use super::error::EgressError;
use crate::api::{EgressCidr, EgressRule, HttpMethod};

/// Time and size limits of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressLimits {
    /// One request from the first byte of its head to the last byte of the
    /// answer, and a whole `CONNECT` tunnel.
    pub timeout: Duration,
    /// Connecting (TCP and upstream TLS) to the upstream.
    pub connect_timeout: Duration,
    /// Largest request body forwarded.
    pub max_request_bytes: usize,
    /// Largest response body returned; bytes through a tunnel, each direction.
    pub max_response_bytes: usize,
}

impl Default for EgressLimits {
    fn default() -> Self {
        EgressLimits {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_request_bytes: 8 * 1024 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

/// One destination, checked and normalised from an [`EgressRule`].
#[derive(Debug, Clone)]
pub(crate) struct HostRule {
    /// `permissions.network.egress[i]`, named in audit records.
    pub name: String,
    pub pattern: HostPattern,
    pub ports: Vec<u16>,
    pub paths: Vec<String>,
    pub methods: Vec<HttpMethod>,
    pub plain_http: bool,
}

/// An exact host name or a `*.suffix` pattern, lower case without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    Exact(String),
    Suffix(String),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<Self, EgressError> {
        let invalid = || EgressError::InvalidRule {
            detail: format!("`{pattern}` is not a host name or `*.suffix`"),
        };
        let (wildcard, name) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let name = canonical_host(name).ok_or_else(invalid)?;
        Ok(if wildcard {
            HostPattern::Suffix(name)
        } else {
            HostPattern::Exact(name)
        })
    }

    /// `host` must already be canonical ([`canonical_host`]).
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Suffix(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        }
    }
}

/// The host name as rules compare it: lower case, one trailing dot dropped,
/// DNS letters-digits-hyphen labels only (IPv4 literals pass as such labels).
/// `None` for anything else, such as IPv6 literals, `_`, `%` or empty labels.
pub(crate) fn canonical_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (host.len() <= 253 && host.split('.').all(label_ok)).then_some(host)
}

/// A request path (or path prefix) in the form rules compare: absolute, no
/// empty (but a trailing), `.` or `..` segment, no `\\`, and no percent
/// escape of `/`, `.`, `\\` or `%` (other escapes, like `%20`, pass). Refusing
/// these instead of decoding them means the upstream sees exactly the path
/// that was checked, whatever it normalises.
pub(crate) fn is_plain_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let lower = path.to_ascii_lowercase();
    if path.contains(['\\', '?', '#'])
        || ["%2e", "%2f", "%5c", "%25"]
            .iter()
            .any(|e| lower.contains(e))
    {
        return false;
    }
    rest.is_empty()
        || rest
            .strip_suffix('/')
            .unwrap_or(rest)
            .split('/')
            .all(|seg| !matches!(seg, "" | "." | ".."))
}

/// True when `path` is `prefix` or below it by whole segments.
pub(crate) fn path_under(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Everything the proxy serving one sandbox enforces.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    pub(crate) rules: Vec<HostRule>,
    pub(crate) allowed_cidrs: Vec<IpNet>,
    pub(crate) credentials: Credentials,
    pub(crate) limits: EgressLimits,
}

impl EgressPolicy {
    /// The tool's `permissions.network.egress` and the ranges allowed by the
    /// ToolPolicies that select it (`rules.sandboxing.allowedEgressCidrs`).
    pub fn new(rules: &[EgressRule], allowed_cidrs: &[EgressCidr]) -> Result<Self, EgressError> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let name = format!("permissions.network.egress[{i}]");
                let paths = rule.paths.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
                if let Some(bad) = paths.iter().find(|p| !is_plain_path(p)) {
                    return Err(EgressError::InvalidRule {
                        detail: format!("{name}.paths: `{bad}` is not a plain absolute path"),
                    });
                }
                Ok(HostRule {
                    pattern: HostPattern::parse(&rule.host)?,
                    ports: if rule.ports.is_empty() {
                        vec![443]
                    } else {
                        rule.ports.clone()
                    },
                    paths,
                    methods: rule.methods.clone(),
                    plain_http: rule.plain_http,
                    name,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let allowed_cidrs = allowed_cidrs
            .iter()
            .map(|cidr| {
                cidr.0
                    .parse::<IpNet>()
                    .map_err(|_| EgressError::InvalidRule {
                        detail: format!("`{}` is not a CIDR range", cidr.0),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EgressPolicy {
            rules,
            allowed_cidrs,
            credentials: Credentials::default(),
            limits: EgressLimits::default(),
        })
    }

    pub fn with_limits(mut self, limits: EgressLimits) -> Self {
        self.limits = limits;
        self
    }

    /// This call's credentials: see [`Credentials::issue`].
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    pub fn limits(&self) -> EgressLimits {
        self.limits
    }

    /// The first rule for `host` (canonical) and `port`; without an explicit
    /// port (an `http://host/` URL), 443 for a TLS rule and 80 for a
    /// `plainHttp` one. A host declared with other ports is a port refusal,
    /// so the audit record says which rule.
    pub(crate) fn rule_for(
        &self,
        host: &str,
        port: Option<u16>,
    ) -> Result<(&HostRule, u16), EgressError> {
        let mut first = None;
        for rule in self.rules.iter().filter(|rule| rule.pattern.matches(host)) {
            let port = port.unwrap_or(if rule.plain_http { 80 } else { 443 });
            if rule.ports.contains(&port) {
                return Ok((rule, port));
            }
            first.get_or_insert((rule.name.clone(), port));
        }
        Err(match first {
            Some((rule, port)) => EgressError::PortNotAllowed { port, rule },
            None => EgressError::HostNotAllowed {
                host: host.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_patterns_match_subdomains_only() {
        let p = HostPattern::parse("*.Example.com.").unwrap();
        assert!(p.matches("api.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("evilexample.com"));
        assert!(!p.matches(".example.com"));
        let exact = HostPattern::parse("api.example.com").unwrap();
        assert!(exact.matches("api.example.com"));
        assert!(!exact.matches("x.api.example.com"));
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("a_b.com").is_err());
    }

    #[test]
    fn host_names_are_canonicalised_or_refused() {
        assert_eq!(
            canonical_host("API.Example.COM."),
            Some("api.example.com".into())
        );
        for bad in [
            "", ".", "a..b", "-a.com", "a-.com", "[::1]", "a b", "a%2e.com", "é.com",
        ] {
            assert_eq!(canonical_host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_plain_paths_are_compared() {
        for ok in [
            "/",
            "/v1",
            "/v1/",
            "/v1/search",
            "/a/...",
            "/.well-known/x",
            "/a%20b",
        ] {
            assert!(is_plain_path(ok), "{ok}");
        }
        for bad in [
            "",
            "v1",
            "//v1",
            "/v1//x",
            "/v1/../admin",
            "/v1/./x",
            "/..",
            "/v1/%2e%2e/admin",
            "/v1%2fadmin",
            "/v1\\..\\admin",
            "/v1/%2E%2E/x",
            "/%252e%252e/x",
        ] {
            assert!(!is_plain_path(bad), "{bad}");
        }
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        assert!(path_under("/v1", "/v1"));
        assert!(path_under("/v1/search", "/v1"));
        assert!(!path_under("/v1admin", "/v1"));
        assert!(path_under("/v1/x", "/v1/"));
        assert!(!path_under("/v1", "/v1/"));
        assert!(path_under("/anything", "/"));
    }
}

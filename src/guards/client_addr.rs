//! Client addresses and IP allow-lists. The client is the connection's peer;
//! `X-Forwarded-For` or `Forwarded` (whichever the proxies are configured to
//! write) is read only when the peer is a trusted proxy, and then from the
//! right: the right-most address that is not a trusted proxy is the client,
//! so entries a client wrote itself (on the left) are never believed.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// A CIDR list entry that does not parse.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{entry}` is not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)")]
pub struct InvalidCidr {
    pub entry: String,
}

impl InvalidCidr {
    pub fn reason(&self) -> &'static str {
        "InvalidCidr"
    }
}

/// A set of networks; a bare address is a one-address network.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Networks, InvalidCidr> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref().trim();
                IpNet::from_str(entry)
                    .map(|net| net.trunc())
                    .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                    .map_err(|_| InvalidCidr {
                        entry: entry.to_string(),
                    })
            })
            .collect::<Result<_, _>>()
            .map(Networks)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `ip` (IPv4-mapped IPv6 read as IPv4) is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// `spec.callers.ipAllowList`: empty allows every address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IpAllowList(Networks);

impl IpAllowList {
    pub fn parse<S: AsRef<str>>(cidrs: &[S]) -> Result<IpAllowList, InvalidCidr> {
        Networks::parse(cidrs).map(IpAllowList)
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        self.0.is_empty() || self.0.contains(client)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which header the trusted proxies append the client address to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=...`.
    Forwarded,
}

/// Proxies whose forwarding header is believed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrustedProxies {
    pub networks: Networks,
    pub header: ForwardedHeader,
}

/// The client's address for a connection from `peer` with `headers`.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.networks.contains(peer) {
        return peer;
    }
    let entries: Vec<&str> = match trusted.header {
        ForwardedHeader::XForwardedFor => header_items(headers, "x-forwarded-for").collect(),
        ForwardedHeader::Forwarded => header_items(headers, "forwarded")
            .filter_map(forwarded_for)
            .collect(),
    };
    let mut client = peer;
    for entry in entries.iter().rev() {
        match parse_node(entry) {
            Some(ip) if trusted.networks.contains(ip) => client = ip,
            Some(ip) => return ip,
            // Garbage or an obfuscated node: the last address vouched for stands.
            None => return client,
        }
    }
    client
}

/// Comma-separated items of every line of a header, in order.
fn header_items<'h>(headers: &'h HeaderMap, name: &str) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(','))
        .map(str::trim)
}

/// The `for=` parameter of one `Forwarded` element.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:443`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = IpAddr::from_str(node) {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return IpAddr::from_str(ip).ok().map(|ip| ip.to_canonical());
    }
    let (ip, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    std::net::Ipv4Addr::from_str(ip).ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn proxies(nets: &[&str], header: ForwardedHeader) -> TrustedProxies {
        TrustedProxies {
            networks: Networks::parse(nets).unwrap(),
            header,
        }
    }

    #[test]
    fn spoofed_headers_from_an_untrusted_peer_change_nothing() {
        let trusted = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        for spoof in [
            headers(&[("x-forwarded-for", "10.1.2.3")]),
            headers(&[("x-forwarded-for", "127.0.0.1, 10.0.0.1")]),
            headers(&[("forwarded", "for=10.1.2.3")]),
            headers(&[("x-forwarded-for", "garbage"), ("x-forwarded-for", "::1")]),
        ] {
            assert_eq!(
                client_address(ip("203.0.113.7"), &spoof, &trusted),
                ip("203.0.113.7")
            );
        }
    }

    #[test]
    fn a_trusted_proxy_is_honoured_right_to_left() {
        let trusted = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        // The client wrote 192.168.1.1 itself; the proxy appended its real address.
        let h = headers(&[("x-forwarded-for", "192.168.1.1, 198.51.100.9")]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &h, &trusted),
            ip("198.51.100.9")
        );
        // Two trusted hops: skipped from the right.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.9"),
            ("x-forwarded-for", "10.0.0.7"),
        ]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &h, &trusted),
            ip("198.51.100.9")
        );
        // A proxy without a header: the proxy itself.
        assert_eq!(
            client_address(ip("10.0.0.5"), &HeaderMap::new(), &trusted),
            ip("10.0.0.5")
        );
        // Garbage right of the proxy: the last trusted address, not the spoof on the left.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, nonsense")]);
        assert_eq!(client_address(ip("10.0.0.5"), &h, &trusted), ip("10.0.0.5"));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        // Proxies that write X-Forwarded-For pass a client's own Forwarded header through.
        let xff = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let h = headers(&[
            ("forwarded", "for=10.9.9.9"),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        assert_eq!(client_address(ip("10.0.0.5"), &h, &xff), ip("198.51.100.9"));
        let fwd = proxies(&["10.0.0.0/8", "2001:db8::/32"], ForwardedHeader::Forwarded);
        let h = headers(&[
            ("x-forwarded-for", "10.9.9.9"),
            (
                "forwarded",
                r#"for=192.0.2.60;proto=http, for="[2001:db8::1]:4711""#,
            ),
        ]);
        assert_eq!(client_address(ip("10.0.0.5"), &h, &fwd), ip("192.0.2.60"));
    }

    #[test]
    fn allow_lists_take_v4_v6_and_mapped_addresses() {
        let list = IpAllowList::parse(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]).unwrap();
        assert!(list.allows(ip("10.200.0.1")));
        assert!(list.allows(ip("::ffff:10.1.1.1")));
        assert!(list.allows(ip("2001:db8:1::5")));
        assert!(list.allows(ip("192.0.2.7")));
        assert!(!list.allows(ip("192.0.2.8")));
        assert!(!list.allows(ip("11.0.0.1")));
        assert!(!list.allows(ip("2001:db9::1")));
        assert!(IpAllowList::default().allows(ip("8.8.8.8")));
        let err = IpAllowList::parse(&["10.0.0.0/33"]).unwrap_err();
        assert_eq!(
            (err.entry.as_str(), err.reason()),
            ("10.0.0.0/33", "InvalidCidr")
        );
        assert!(IpAllowList::parse(&["example.com"]).is_err());
    }
}

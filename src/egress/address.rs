//! Which addresses the proxy may connect to: public unicast only, unless a
//! ToolPolicy allows a range (`rules.sandboxing.allowedEgressCidrs`).
//!
//! The check runs on the address the proxy is about to connect to (never on a
//! name), and IPv6 forms that carry an IPv4 address (mapped, compatible,
//! NAT64, 6to4) are judged by the IPv4 address they lead to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Ranges that are not public unicast, with the name an audit record gives.
const NOT_PUBLIC: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified (this network)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (incl. broadcast)"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments (incl. Teredo)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing SIDs"),
    (
        "fc00::/7",
        "unique local (incl. fd00:ec2::254 cloud metadata)",
    ),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The range that matched, e.g. `127.0.0.0/8`.
    pub range: IpNet,
    /// What that range is, e.g. `loopback`.
    pub kind: &'static str,
}

/// The IPv4 address an IPv6 address stands for, when it embeds one the
/// network will route to: IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96)
/// and 6to4 (2002::/16).
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let seg = ip.segments();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let compatible = seg[..6] == [0; 6] && ip != Ipv6Addr::UNSPECIFIED && ip != Ipv6Addr::LOCALHOST;
    let nat64 = seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if compatible || nat64 {
        Some(tail)
    } else if seg[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

fn not_public_ranges() -> &'static [(IpNet, &'static str)] {
    static RANGES: std::sync::LazyLock<Vec<(IpNet, &'static str)>> =
        std::sync::LazyLock::new(|| {
            NOT_PUBLIC
                .iter()
                .map(|(net, kind)| (net.parse().expect("valid built-in range"), *kind))
                .collect()
        });
    &RANGES
}

fn first_refusal(ip: IpAddr) -> Option<Refusal> {
    not_public_ranges()
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(range, kind)| Refusal {
            range: *range,
            kind,
        })
}

/// Checks `ip` against the non-public ranges; an address inside one of
/// `allowed` passes (an embedded IPv4 address counts as itself).
pub fn check(ip: IpAddr, allowed: &[IpNet]) -> Result<(), Refusal> {
    let embedded = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    let forms = [Some(ip), embedded];
    let is_allowed = |addr: IpAddr| allowed.iter().any(|net| net.contains(&addr));
    if forms.iter().flatten().any(|addr| is_allowed(*addr)) {
        return Ok(());
    }
    // The embedded IPv4 address decides first: `::ffff:127.0.0.1` is loopback,
    // not merely "IPv4-mapped".
    match embedded
        .and_then(first_refusal)
        .or_else(|| first_refusal(ip))
    {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(addr: &str) -> Option<&'static str> {
        check(addr.parse().unwrap(), &[]).err().map(|r| r.kind)
    }

    #[test]
    fn every_non_public_form_is_refused() {
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::7f00:1", "loopback"),
            ("2002:7f00:1::1", "loopback"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
            (
                "fd00:ec2::254",
                "unique local (incl. fd00:ec2::254 cloud metadata)",
            ),
            ("10.0.0.1", "private (RFC 1918)"),
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("0.0.0.0", "unspecified (this network)"),
            ("::", "unspecified"),
            ("255.255.255.255", "reserved (incl. broadcast)"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local (deprecated)"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("2001:db8::1", "documentation"),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                "IETF protocol assignments (incl. Teredo)",
            ),
            ("64:ff9b:1::1", "local-use NAT64"),
        ] {
            assert_eq!(refused(addr), Some(kind), "{addr}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in [
            "93.184.215.14",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(refused(addr), None, "{addr}");
        }
    }

    #[test]
    fn an_allowed_range_admits_its_addresses_and_their_ipv6_forms_only() {
        let allowed: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        for ok in ["127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"] {
            assert_eq!(check(ok.parse().unwrap(), &allowed), Ok(()), "{ok}");
        }
        for still_refused in ["::1", "10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1"] {
            assert!(
                check(still_refused.parse().unwrap(), &allowed).is_err(),
                "{still_refused}"
            );
        }
    }
}

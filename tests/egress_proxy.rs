//! The egress proxy, attacked through real HTTP and TLS on loopback: the
//! upstreams are real servers (HTTPS with a CA from rcgen that only this test
//! trusts), names resolve to what each test decides, and every refusal is
//! checked both in the answer and in the upstream, which must see nothing.

#[path = "egress_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Names, Proxy, TestPki, Upstream, connect, get, request, send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toolwarden::api::{EgressCidr, EgressRule, SecretUse};
use toolwarden::egress::{
    Credentials, EgressEvent, EgressLimits, EgressOutcome, EgressPolicy, MAX_CONNECTIONS,
    UpstreamTls,
};

const SECRET: &str = "sk-live-REAL-0123456789";

fn rules(yaml: &str) -> Vec<EgressRule> {
    serde_yaml::from_str(yaml).unwrap()
}

fn cidrs(ranges: &[&str]) -> Vec<EgressCidr> {
    ranges.iter().map(|r| EgressCidr(r.to_string())).collect()
}

fn loopback() -> Vec<EgressCidr> {
    cidrs(&["127.0.0.0/8"])
}

fn no_tls() -> UpstreamTls {
    UpstreamTls::with_roots(rustls::RootCertStore::empty()).unwrap()
}

/// A plain-HTTP upstream reached as `plain.test`, the policy allowing loopback.
async fn plain_setup() -> (Upstream, Proxy, Arc<Names>) {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let names = Arc::new(Names::default());
    names.set("plain.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: plain.test, ports: [{}], plainHttp: true}}",
            upstream.port()
        )),
        &loopback(),
    )
    .unwrap();
    let proxy = Proxy::start(policy, no_tls(), names.clone()).await;
    (upstream, proxy, names)
}

/// An HTTPS upstream reached as `secure.test` (its certificate also names `hosts`), the
/// policy allowing tunnels to it and loopback; the proxy forwards without its own TLS.
async fn tls_setup(hosts: &[&str]) -> (TestPki, Upstream, Proxy) {
    let pki = TestPki::new(hosts);
    let upstream = Upstream::start("127.0.0.1:0", Some(pki.server.clone()))
        .await
        .unwrap();
    let names = Arc::new(Names::default());
    names.set("secure.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: secure.test, ports: [{}]}}",
            upstream.port()
        )),
        &loopback(),
    )
    .unwrap();
    let proxy = Proxy::start(policy, no_tls(), names).await;
    (pki, upstream, proxy)
}

fn denied(event: &EgressEvent, reason: &str) -> bool {
    event.reason == Some(reason)
}

#[tokio::test]
async fn a_declared_host_is_reached_and_audited() {
    let (upstream, proxy, _) = plain_setup().await;
    let url = format!("http://plain.test:{}/v1/items?page=2", upstream.port());
    let host = format!("plain.test:{}", upstream.port());
    let answer = send(
        proxy.addr,
        request("POST", &url, &[("host", &host)], r#"{"a":1}"#),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(&answer.body[..], br#"{"ok":true}"#);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/v1/items?page=2", "origin-form upstream");
    assert_eq!(seen[0].headers["host"], host.as_str());
    assert_eq!(&seen[0].body[..], br#"{"a":1}"#);
    let event = proxy.audit.wait_for(|e| e.status == 200).await;
    assert_eq!(event.outcome, EgressOutcome::Allowed);
    assert_eq!(
        (
            event.method.as_str(),
            event.host.as_str(),
            event.port,
            event.path.as_str()
        ),
        ("POST", "plain.test", upstream.port(), "/v1/items")
    );
    assert_eq!((event.bytes_sent, event.bytes_received), (7, 11));
    assert_eq!(event.rule.as_deref(), Some("permissions.network.egress[0]"));
    assert_eq!(event.address, Some("127.0.0.1".parse().unwrap()));
    // The upstream's hop-by-hop header (listed in its Connection) is not passed back.
    assert!(answer.headers.get("x-upstream-hop").is_none());
}

#[tokio::test]
async fn undeclared_hosts_and_ports_are_denied() {
    let (upstream, proxy, names) = plain_setup().await;
    names.set("other.test", &[&["127.0.0.1"]]);
    let port = upstream.port();
    for (url, reason) in [
        (format!("http://other.test:{port}/"), "HostNotAllowed"),
        (format!("http://sub.plain.test:{port}/"), "HostNotAllowed"),
        (format!("http://plain.test.evil:{port}/"), "HostNotAllowed"),
        (format!("http://127.0.0.1:{port}/"), "HostNotAllowed"),
        ("http://plain.test/".to_string(), "PortNotAllowed"),
        (format!("http://plain.test:{}/", port ^ 1), "PortNotAllowed"),
    ] {
        let answer = send(proxy.addr, get(&url, &[])).await;
        assert_eq!((answer.status, answer.reason()), (403, reason), "{url}");
    }
    let (status, reason, _) = connect(proxy.addr, &format!("other.test:{port}")).await;
    assert_eq!((status, reason.as_str()), (403, "HostNotAllowed"));
    assert_eq!(
        upstream.connection_count(),
        0,
        "nothing reached the upstream"
    );
    let event = proxy.audit.wait_for(|e| e.host == "other.test").await;
    assert_eq!(event.outcome, EgressOutcome::Denied);
    assert_eq!(
        event.denied_by.as_deref(),
        Some("permissions.network.egress (default deny)")
    );
    let event = proxy.audit.wait_for(|e| denied(e, "PortNotAllowed")).await;
    assert_eq!(
        event.denied_by.as_deref(),
        Some("permissions.network.egress[0].ports")
    );
}

/// SSRF: a declared name that resolves to an internal address, or an
/// internal address declared literally, is refused unless a ToolPolicy
/// allows its range; allowing loopback allows nothing else.
#[tokio::test]
async fn internal_addresses_are_refused_even_through_declared_names() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let upstream6 = Upstream::start("[::1]:0", None).await.ok();
    let port = upstream.port();
    let internal = [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "10.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",
        "fd00:ec2::254",
        "100.64.0.1",
        "0.0.0.0",
        "192.168.0.1",
        "fe80::1",
        "224.0.0.1",
    ];
    for allowed in [vec![], loopback()] {
        let names = Arc::new(Names::default());
        let loopback_allowed = !allowed.is_empty();
        let policy = EgressPolicy::new(
            &rules(&format!(
                "- {{host: evil.test, ports: [{port}], plainHttp: true}}\n\
                 - {{host: tls.evil.test, ports: [{port}]}}\n\
                 - {{host: 127.0.0.1, ports: [{port}], plainHttp: true}}\n\
                 - {{host: 10.0.0.1, ports: [{port}], plainHttp: true}}"
            )),
            &allowed,
        )
        .unwrap();
        let proxy = Proxy::start(policy, no_tls(), names.clone()).await;
        for address in internal {
            let v4_loopback = address == "127.0.0.1"
                || address == "::ffff:127.0.0.1"
                || address == "64:ff9b::7f00:1";
            if loopback_allowed && v4_loopback {
                continue;
            }
            names.set("evil.test", &[&[address]]);
            names.set("tls.evil.test", &[&[address]]);
            let answer = send(proxy.addr, get(&format!("http://evil.test:{port}/"), &[])).await;
            assert_eq!(
                (answer.status, answer.reason()),
                (403, "AddressNotAllowed"),
                "{address} (allowed: {allowed:?})"
            );
            let (status, reason, _) = connect(proxy.addr, &format!("tls.evil.test:{port}")).await;
            assert_eq!(
                (status, reason.as_str()),
                (403, "AddressNotAllowed"),
                "CONNECT {address}"
            );
        }
        // A name answering one internal and no public address is refused too.
        names.set("evil.test", &[&["169.254.169.254", "10.0.0.1"]]);
        let answer = send(proxy.addr, get(&format!("http://evil.test:{port}/"), &[])).await;
        assert_eq!(answer.reason(), "AddressNotAllowed");
        // Literal addresses are checked the same way.
        let answer = send(proxy.addr, get(&format!("http://10.0.0.1:{port}/"), &[])).await;
        assert_eq!(answer.reason(), "AddressNotAllowed");
        let literal = send(proxy.addr, get(&format!("http://127.0.0.1:{port}/"), &[])).await;
        assert_eq!(literal.status == 200, loopback_allowed, "literal 127.0.0.1");

        let event = proxy
            .audit
            .wait_for(|e| e.address == Some("169.254.169.254".parse().unwrap()))
            .await;
        assert_eq!(event.outcome, EgressOutcome::Denied);
        assert_eq!(
            event.denied_by.as_deref(),
            Some("non-public address 169.254.0.0/16 (sandboxing.allowedEgressCidrs)")
        );
    }
    // Only the one allowed literal request got through, once.
    assert_eq!(upstream.connection_count(), 1);
    if let Some(upstream6) = upstream6 {
        assert_eq!(upstream6.connection_count(), 0, "::1 was never reached");
    }
}

#[tokio::test]
async fn loopback_through_a_name_needs_the_allowed_cidr() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let url = format!("http://plain.test:{}/", upstream.port());
    let yaml = format!(
        "- {{host: plain.test, ports: [{}], plainHttp: true}}",
        upstream.port()
    );
    for (allowed, status) in [
        (vec![], 403),
        (loopback(), 200),
        (cidrs(&["127.0.0.2/32"]), 403),
    ] {
        let names = Arc::new(Names::default());
        names.set("plain.test", &[&["127.0.0.1"]]);
        let policy = EgressPolicy::new(&rules(&yaml), &allowed).unwrap();
        let proxy = Proxy::start(policy, no_tls(), names).await;
        let answer = send(proxy.addr, get(&url, &[])).await;
        assert_eq!(answer.status, status, "allowed {allowed:?}");
    }
    assert_eq!(upstream.connection_count(), 1);
}

/// DNS rebinding: the name answers a public address when checked and
/// loopback afterwards. The proxy resolves once and connects to the address
/// it checked, so the loopback upstream is never reached.
#[tokio::test]
async fn rebinding_between_check_and_connect_is_impossible() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let port = upstream.port();
    let names = Arc::new(Names::default());
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: rebind.test, ports: [{port}], plainHttp: true}}\n\
             - {{host: tls-rebind.test, ports: [{port}]}}"
        )),
        &[],
    )
    .unwrap()
    .with_limits(EgressLimits {
        connect_timeout: Duration::from_millis(300),
        ..EgressLimits::default()
    });
    let proxy = Proxy::start(policy, no_tls(), names.clone()).await;
    // A public address (documentation ranges would be refused at the check);
    // whether it answers or not, the loopback upstream must see nothing.
    names.set("rebind.test", &[&["1.0.0.19"], &["127.0.0.1"]]);
    let answer = send(proxy.addr, get(&format!("http://rebind.test:{port}/"), &[])).await;
    assert_ne!(answer.status, 200);
    assert_eq!(names.calls(), 1, "resolved exactly once");
    let event = proxy.audit.wait_for(|e| e.host == "rebind.test").await;
    assert_eq!(event.address, Some("1.0.0.19".parse().unwrap()));

    // The same for a tunnel: checked when CONNECT arrives, never resolved again.
    names.set("tls-rebind.test", &[&["1.0.0.19"], &["127.0.0.1"]]);
    let (status, _, tunnel) = connect(proxy.addr, &format!("tls-rebind.test:{port}")).await;
    assert_eq!(status, 200);
    let pki = TestPki::new(&["tls-rebind.test"]);
    let name = rustls::pki_types::ServerName::try_from("tls-rebind.test").unwrap();
    assert!(pki.client().connect(name, tunnel.unwrap()).await.is_err());
    assert_eq!(names.calls(), 2, "one resolution per request");

    // And the other way: loopback first (refused) is not retried.
    names.set("rebind.test", &[&["127.0.0.1"], &["1.0.0.19"]]);
    let answer = send(proxy.addr, get(&format!("http://rebind.test:{port}/"), &[])).await;
    assert_eq!(answer.reason(), "AddressNotAllowed");
    assert_eq!(names.calls(), 3);
    assert_eq!(upstream.connection_count(), 0, "loopback never reached");
}

/// An HTTPS upstream: the tool asks `http://secure.test/...`, the proxy opens
/// TLS (trusting the test CA only) and puts the real key in the declared
/// header; the tool only ever held a placeholder.
#[tokio::test]
async fn https_upstream_gets_the_injected_credential() {
    let pki = TestPki::new(&["secure.test"]);
    let upstream = Upstream::start("127.0.0.1:0", Some(pki.server.clone()))
        .await
        .unwrap();
    let names = Arc::new(Names::default());
    names.set("secure.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: secure.test, ports: [{}]}}",
            upstream.port()
        )),
        &loopback(),
    )
    .unwrap();
    let mut credentials = Credentials::default();
    let placeholder = credentials
        .issue(
            &secret(
                "{host: secure.test, header: Authorization, prefix: 'Bearer ', pathPrefix: /v1}",
            ),
            format!("{SECRET}\n").as_bytes(),
        )
        .unwrap();
    assert!(!placeholder.contains(SECRET));
    let proxy = Proxy::start(
        policy.with_credentials(credentials),
        pki.upstream_tls(),
        names,
    )
    .await;
    let url = format!("http://secure.test:{}/v1/me", upstream.port());
    let bearer = format!("Bearer {placeholder}");
    let answer = send(proxy.addr, get(&url, &[("authorization", &bearer)])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    let event = proxy.audit.wait_for(|e| e.status == 200).await;
    assert_eq!(event.injected, vec!["api-keys/example".to_string()]);
    let record = serde_json::to_string(&proxy.audit.events()).unwrap();
    assert!(!record.contains(SECRET) && !record.contains(&placeholder));
    // Without a header the upstream gets none: nothing is added unasked.
    let answer = send(proxy.addr, get(&url, &[])).await;
    assert_eq!(answer.status, 200);
    assert!(
        upstream.requests()[1]
            .headers
            .get("authorization")
            .is_none()
    );
}

#[tokio::test]
async fn an_upstream_the_proxy_cannot_verify_is_refused() {
    let pki = TestPki::new(&["secure.test"]);
    let upstream = Upstream::start("127.0.0.1:0", Some(pki.server.clone()))
        .await
        .unwrap();
    let names = Arc::new(Names::default());
    // An impostor: `impostor.test` is served with secure.test's certificate.
    names.set("impostor.test", &[&["127.0.0.1"]]);
    names.set("secure.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: impostor.test, ports: [{0}]}}\n- {{host: secure.test, ports: [{0}]}}",
            upstream.port()
        )),
        &loopback(),
    )
    .unwrap();
    let other_ca = TestPki::new(&["secure.test"]);
    for (tls, host) in [
        (pki.upstream_tls(), "impostor.test"),
        (other_ca.upstream_tls(), "secure.test"),
    ] {
        let proxy = Proxy::start(policy.clone(), tls, names.clone()).await;
        let url = format!("http://{host}:{}/", upstream.port());
        let answer = send(proxy.addr, get(&url, &[])).await;
        assert_eq!(
            (answer.status, answer.reason()),
            (502, "UpstreamTls"),
            "{host}"
        );
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_tunnel_reaches_the_declared_https_host() {
    let (pki, upstream, proxy) = tls_setup(&["secure.test"]).await;
    let (status, _, tunnel) =
        connect(proxy.addr, &format!("secure.test:{}", upstream.port())).await;
    assert_eq!(status, 200);
    let name = rustls::pki_types::ServerName::try_from("secure.test").unwrap();
    let mut tls = pki.client().connect(name, tunnel.unwrap()).await.unwrap();
    tls.write_all(b"GET /t HTTP/1.1\r\nHost: secure.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"ok":true}"#));
    drop(tls);
    let event = proxy.audit.wait_for(|e| e.method == "CONNECT").await;
    assert_eq!(event.outcome, EgressOutcome::Allowed);
    assert!(
        event.bytes_sent > 0 && event.bytes_received > 0,
        "{event:?}"
    );
    assert_eq!(upstream.requests()[0].target, "/t");
}

/// A tunnel to a declared host must carry TLS for that host: another SNI
/// (domain fronting), no SNI, or no TLS at all closes it before a single
/// byte reaches the upstream.
#[tokio::test]
async fn a_tunnel_with_another_sni_or_no_tls_is_refused() {
    let (pki, upstream, proxy) = tls_setup(&["secure.test", "other.test"]).await;
    let authority = format!("secure.test:{}", upstream.port());
    for (sni, reason) in [("other.test", "SniMismatch"), ("127.0.0.1", "NoSni")] {
        let (status, _, tunnel) = connect(proxy.addr, &authority).await;
        assert_eq!(status, 200);
        let name = rustls::pki_types::ServerName::try_from(sni).unwrap();
        assert!(
            pki.client().connect(name, tunnel.unwrap()).await.is_err(),
            "{sni}"
        );
        let event = proxy.audit.wait_for(|e| denied(e, reason)).await;
        assert_eq!(event.outcome, EgressOutcome::Denied);
        assert_eq!(
            event.denied_by.as_deref(),
            Some("CONNECT needs TLS whose SNI is the declared host")
        );
    }
    let (_, _, tunnel) = connect(proxy.addr, &authority).await;
    let mut tunnel = tunnel.unwrap();
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.ok();
    assert!(rest.is_empty(), "closed without an answer");
    proxy.audit.wait_for(|e| denied(e, "NotTls")).await;
    assert_eq!(
        upstream.connection_count(),
        0,
        "nothing reached the upstream"
    );
}

fn secret(inject: &str) -> SecretUse {
    serde_yaml::from_str(&format!(
        "{{secretName: api-keys, key: example, inject: {inject}}}"
    ))
    .unwrap()
}

/// Exfiltration attempts with the placeholder: to another declared host,
/// outside the path prefix, in the URL, in the body, in another header, in a
/// CONNECT. Each is refused with 403 and recorded as credential misuse, and
/// no upstream sees the request.
#[tokio::test]
async fn a_placeholder_sent_anywhere_else_is_refused_and_audited() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let names = Arc::new(Names::default());
    names.set("plain.test", &[&["127.0.0.1"]]);
    names.set("other.test", &[&["127.0.0.1"]]);
    let port = upstream.port();
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: plain.test, ports: [{port}], plainHttp: true}}\n\
             - {{host: other.test, ports: [{port}], plainHttp: true}}\n\
             - {{host: other.test, ports: [443]}}"
        )),
        &loopback(),
    )
    .unwrap();
    let mut credentials = Credentials::default();
    let ph = credentials
        .issue(
            &secret("{host: plain.test, header: X-API-Key, pathPrefix: /v1}"),
            SECRET.as_bytes(),
        )
        .unwrap();
    let proxy = Proxy::start(policy.with_credentials(credentials), no_tls(), names).await;
    let base = format!("http://plain.test:{port}");
    let other = format!("http://other.test:{port}");
    let attempts = [
        (
            "GET",
            format!("{other}/v1/x"),
            vec![("x-api-key", ph.clone())],
            "",
        ),
        (
            "GET",
            format!("{base}/v2/x"),
            vec![("x-api-key", ph.clone())],
            "",
        ),
        ("GET", format!("{base}/v1/x?key={ph}"), vec![], ""),
        ("GET", format!("{base}/v1/{ph}"), vec![], ""),
        ("POST", format!("{base}/v1/x"), vec![], "leak"),
        (
            "GET",
            format!("{base}/v1/x"),
            vec![("x-other", ph.clone())],
            "",
        ),
        (
            "GET",
            format!("{base}/v1/x"),
            vec![("cookie", format!("k={ph}"))],
            "",
        ),
        (
            "GET",
            format!("{base}/v1/x"),
            vec![("x-api-key", format!("{ph}x"))],
            "",
        ),
        (
            "GET",
            format!("{base}/v1/x"),
            vec![("referer", format!("http://x/?{ph}"))],
            "",
        ),
    ];
    for (method, url, headers, body) in &attempts {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let body = if *body == "leak" {
            format!("{{\"k\":\"{ph}\"}}")
        } else {
            String::new()
        };
        let answer = send(proxy.addr, request(method, url, &headers, &body)).await;
        assert_eq!(
            (answer.status, answer.reason()),
            (403, "CredentialMisuse"),
            "{method} {url} {headers:?}"
        );
        assert!(!String::from_utf8_lossy(&answer.body).contains(SECRET));
    }
    // In a CONNECT's headers.
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let connect_request = hyper::Request::builder()
        .method("CONNECT")
        .uri("other.test:443")
        .header("x-api-key", &ph)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let answer = sender.send_request(connect_request).await.unwrap();
    assert_eq!(answer.status(), 403);

    assert!(
        upstream.requests().is_empty(),
        "no upstream saw any attempt"
    );
    let misuse: Vec<EgressEvent> = proxy
        .audit
        .events()
        .into_iter()
        .filter(|e| e.outcome == EgressOutcome::CredentialMisuse)
        .collect();
    assert_eq!(misuse.len(), attempts.len() + 1, "{misuse:#?}");
    assert!(misuse.iter().all(|e| {
        e.reason == Some("CredentialMisuse")
            && e.denied_by.as_deref() == Some("secrets[api-keys/example].inject")
            && e.status == 403
    }));
    // The declared use still works.
    let answer = send(
        proxy.addr,
        get(&format!("{base}/v1/ok"), &[("x-api-key", &ph)]),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.requests()[0].headers["x-api-key"], SECRET);
}

#[tokio::test]
async fn hop_by_hop_and_proxy_headers_are_not_forwarded() {
    let (upstream, proxy, _) = plain_setup().await;
    let url = format!("http://plain.test:{}/", upstream.port());
    let answer = send(
        proxy.addr,
        get(
            &url,
            &[
                ("connection", "keep-alive, x-private-hop"),
                ("x-private-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("proxy-authorization", "Basic c2VjcmV0OnBhc3N3b3Jk"),
                ("proxy-connection", "keep-alive"),
                ("proxy-custom", "1"),
                ("x-kept", "yes"),
                ("cookie", "session=abc"),
            ],
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    let headers = &upstream.requests()[0].headers;
    for gone in [
        "connection",
        "x-private-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "proxy-custom",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} was forwarded: {headers:?}"
        );
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(
        headers["cookie"], "session=abc",
        "a cookie goes to the host it was sent to"
    );
}

#[tokio::test]
async fn a_host_header_for_another_host_is_refused() {
    let (upstream, proxy, _) = plain_setup().await;
    let port = upstream.port();
    let url = format!("http://plain.test:{port}/");
    for host in ["evil.test", "plain.test", &format!("evil.test:{port}")] {
        let answer = send(proxy.addr, get(&url, &[("host", host)])).await;
        assert_eq!(
            (answer.status, answer.reason()),
            (400, "HostMismatch"),
            "{host}"
        );
    }
    for (target, reason) in [
        ("/direct", "NotProxyRequest"),
        (
            &format!("https://plain.test:{port}/") as &str,
            "NotProxyRequest",
        ),
        (
            &format!("http://user:pw@plain.test:{port}/"),
            "NotProxyRequest",
        ),
    ] {
        let answer = send(proxy.addr, get(target, &[("host", "plain.test")])).await;
        assert_eq!((answer.status, answer.reason()), (400, reason), "{target}");
    }
    assert_eq!(upstream.connection_count(), 0);
}

#[tokio::test]
async fn paths_and_methods_are_limited_per_host() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let port = upstream.port();
    let names = Arc::new(Names::default());
    names.set("api.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: api.test, ports: [{port}], plainHttp: true, paths: [/v1/search, /public/], methods: [GET, HEAD]}}"
        )),
        &loopback(),
    )
    .unwrap();
    let proxy = Proxy::start(policy, no_tls(), names).await;
    let base = format!("http://api.test:{port}");
    for (method, path, expect) in [
        ("GET", "/v1/search", (200, "")),
        ("GET", "/v1/search/deep?q=1", (200, "")),
        ("HEAD", "/public/x", (200, "")),
        ("POST", "/v1/search", (403, "MethodNotAllowed")),
        ("DELETE", "/public/x", (403, "MethodNotAllowed")),
        ("GET", "/v1/searchx", (403, "PathNotAllowed")),
        ("GET", "/public", (403, "PathNotAllowed")),
        ("GET", "/admin", (403, "PathNotAllowed")),
        ("GET", "/v1/search/../../admin", (400, "PathNotPlain")),
        (
            "GET",
            "/v1/search/%2e%2e/%2E%2E/admin",
            (400, "PathNotPlain"),
        ),
        ("GET", "/v1/search%2f..%2fadmin", (400, "PathNotPlain")),
        ("GET", "//v1/search", (400, "PathNotPlain")),
    ] {
        let answer = send(
            proxy.addr,
            request(method, &format!("{base}{path}"), &[], ""),
        )
        .await;
        assert_eq!((answer.status, answer.reason()), expect, "{method} {path}");
    }
    assert_eq!(upstream.requests().len(), 3);
    let (status, reason, _) = connect(proxy.addr, &format!("api.test:{port}")).await;
    assert_eq!((status, reason.as_str()), (403, "TunnelNotAllowed"));
    let event = proxy.audit.wait_for(|e| denied(e, "PathNotAllowed")).await;
    assert_eq!(
        event.denied_by.as_deref(),
        Some("permissions.network.egress[0].paths")
    );
}

/// A tunnel would hide paths and methods, and a plain-HTTP rule's traffic
/// is not TLS: both refuse `CONNECT` before anything is resolved.
#[tokio::test]
async fn a_tunnel_is_refused_where_the_proxy_could_not_enforce_the_rule() {
    let names = Arc::new(Names::default());
    names.set("api.test", &[&["127.0.0.1"]]);
    names.set("plain.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(
            "- {host: api.test, methods: [GET]}\n\
             - {host: plain.test, ports: [80], plainHttp: true}",
        ),
        &loopback(),
    )
    .unwrap();
    let proxy = Proxy::start(policy, no_tls(), names.clone()).await;
    for (authority, refusal) in [
        ("api.test:443", "TunnelNotAllowed"),
        ("plain.test:80", "TunnelToPlainHttp"),
    ] {
        let (status, reason, _) = connect(proxy.addr, authority).await;
        assert_eq!((status, reason.as_str()), (403, refusal), "{authority}");
    }
    assert_eq!(names.calls(), 0, "refused before resolving");
}

#[tokio::test]
async fn oversized_and_slow_exchanges_are_cut() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let port = upstream.port();
    let names = Arc::new(Names::default());
    names.set("plain.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: plain.test, ports: [{port}], plainHttp: true}}"
        )),
        &loopback(),
    )
    .unwrap()
    .with_limits(EgressLimits {
        timeout: Duration::from_secs(1),
        max_request_bytes: 1024,
        max_response_bytes: 1024 * 1024,
        ..EgressLimits::default()
    });
    let proxy = Proxy::start(policy, no_tls(), names).await;
    let base = format!("http://plain.test:{port}");
    let answer = send(proxy.addr, get(&format!("{base}/big"), &[])).await;
    assert_eq!((answer.status, answer.reason()), (502, "ResponseTooLarge"));
    let big_body = "x".repeat(2048);
    let answer = send(
        proxy.addr,
        request("POST", &format!("{base}/up"), &[], &big_body),
    )
    .await;
    assert_eq!((answer.status, answer.reason()), (413, "RequestTooLarge"));
    let started = std::time::Instant::now();
    let answer = send(proxy.addr, get(&format!("{base}/slow"), &[])).await;
    assert_eq!((answer.status, answer.reason()), (504, "Timeout"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let paths: Vec<String> = upstream.requests().into_iter().map(|s| s.target).collect();
    assert_eq!(
        paths,
        vec!["/big", "/slow"],
        "the oversized request was not sent"
    );
}

/// A tool opening tunnels or connections without end: past the limit the
/// proxy takes no more, and a slot frees up when a tunnel ends.
#[tokio::test]
async fn a_tool_cannot_hold_unbounded_tunnels_or_connections() {
    let names = Arc::new(Names::default());
    names.set("secure.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(&rules("- {host: secure.test}"), &loopback()).unwrap();
    let proxy = Proxy::start(policy, no_tls(), names).await;
    let mut tunnels = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let (status, _, tunnel) = connect(proxy.addr, "secure.test:443").await;
        assert_eq!(status, 200);
        tunnels.push(tunnel.unwrap());
    }
    let (status, reason, _) = connect(proxy.addr, "secure.test:443").await;
    assert_eq!((status, reason.as_str()), (503, "TooManyConnections"));
    // Closing one tunnel frees its slot once its task sees the end.
    drop(tunnels.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connect(proxy.addr, "secure.test:443").await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Idle connections: the one past the limit is closed unanswered.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    extra
        .write_all(b"CONNECT secure.test:443 HTTP/1.1\r\nHost: secure.test:443\r\n\r\n")
        .await
        .ok();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer))
        .await
        .expect("closed at once")
        .ok();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}

/// The proxy serves any listener it is handed; the sandbox wiring may pass
/// a Unix socket as well as a TCP one.
#[tokio::test]
async fn the_proxy_serves_a_unix_listener() {
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let names = Arc::new(Names::default());
    names.set("plain.test", &[&["127.0.0.1"]]);
    let policy = EgressPolicy::new(
        &rules(&format!(
            "- {{host: plain.test, ports: [{}], plainHttp: true}}",
            upstream.port()
        )),
        &loopback(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("egress.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let audit = Arc::new(support::Recorder::default());
    let proxy =
        toolwarden::egress::EgressProxy::new(policy, no_tls(), audit.clone()).with_resolver(names);
    let serving = tokio::spawn(proxy.serve(listener));
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let request = format!(
        "GET http://plain.test:{}/u HTTP/1.1\r\nConnection: close\r\n\r\n",
        upstream.port()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.requests()[0].target, "/u");
    audit.wait_for(|e| e.path == "/u" && e.status == 200).await;
    serving.abort();
}

/// When the call ends the runner drops `serve`: an established tunnel must
/// close with it, not outlive the call.
#[tokio::test]
async fn dropping_serve_closes_open_tunnels() {
    let (pki, upstream, proxy) = tls_setup(&["secure.test"]).await;
    let (_, _, tunnel) = connect(proxy.addr, &format!("secure.test:{}", upstream.port())).await;
    let name = rustls::pki_types::ServerName::try_from("secure.test").unwrap();
    let mut tls = pki.client().connect(name, tunnel.unwrap()).await.unwrap();
    tls.write_all(b"GET /1 HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    tls.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    drop(proxy);
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the tunnel outlived the proxy");
}

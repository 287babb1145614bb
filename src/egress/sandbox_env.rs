//! What a sandbox with egress is told about its proxy.

/// Port the proxy listens on, on `127.0.0.1` inside each sandbox's own network namespace
/// (every sandbox has its own, so one port serves them all).
pub const SANDBOX_PROXY_PORT: u16 = 3128;

/// The variables [`proxy_env`] sets; a tool's own variables may not use these names.
pub const PROXY_ENV: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// The proxy variables of a sandbox whose proxy listens on `127.0.0.1:port`, in both spellings
/// (curl and wget read the lower-case ones, many libraries the upper-case). `NO_PROXY` keeps the
/// sandbox's own loopback direct: it leads nowhere but the sandbox itself.
pub fn proxy_env(port: u16) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{port}");
    let direct = "localhost,127.0.0.1,::1".to_string();
    PROXY_ENV
        .iter()
        .map(|name| {
            let value = if name.eq_ignore_ascii_case("NO_PROXY") {
                direct.clone()
            } else {
                proxy.clone()
            };
            (name.to_string(), value)
        })
        .collect()
}

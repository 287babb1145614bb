//! Name resolution behind a trait, so tests can decide what a name resolves to.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;

pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Resolves a host name to addresses. The proxy calls it once per request
/// and connects only to an address it checked from that answer.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;
}

/// The system resolver (`getaddrinfo` through tokio's `lookup_host`), which
/// honours `/etc/hosts` and the pod's DNS settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|addr| addr.ip())
                .collect())
        })
    }
}

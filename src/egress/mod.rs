//! The egress proxy: the only way out of a sandbox whose tool declares
//! `permissions.network.egress`.
//!
//! It is an HTTP forward proxy served on whatever listener the caller hands
//! [`EgressProxy::serve`] (the sandbox wiring passes a socket created inside
//! the sandbox's network namespace). It admits `CONNECT host:port` tunnels
//! carrying TLS whose SNI is the declared host, and absolute-form
//! `http://host/...` requests, which it sends on over TLS (system roots)
//! unless the rule is `plainHttp`, swapping real credentials in for
//! per-call placeholders ([`Credentials`]). Names are resolved once by the
//! proxy, every address is checked ([`address`]) and the connection goes to
//! exactly the checked address. Every request becomes an [`EgressEvent`].
//!
//! The runner's sandbox executor serves one per call of a tool with egress, on a socket inside
//! the sandbox's network namespace ([`SANDBOX_PROXY_PORT`], [`proxy_env`]); see the README's
//! "Egress proxy" section.

pub mod address;
mod audit;
mod credentials;
mod error;
mod policy;
mod proxy;
mod resolve;
mod sandbox_env;
mod sni;

pub use audit::{EgressAudit, EgressEvent, EgressOutcome};
pub use credentials::{Credentials, PLACEHOLDER_PREFIX};
pub use error::EgressError;
pub use policy::{EgressLimits, EgressPolicy};
pub use proxy::{EgressProxy, Listener, MAX_CONNECTIONS, REASON_HEADER, UpstreamTls};
pub use resolve::{ResolveFuture, Resolver, SystemResolver};
pub use sandbox_env::{PROXY_ENV, SANDBOX_PROXY_PORT, proxy_env};

//! The server name (SNI) of the TLS ClientHello that opens a `CONNECT` tunnel.
//!
//! rustls' `Acceptor` is the parser: it is the ClientHello parsing rustls
//! servers rely on (fragmented records, extensions, GREASE), already a
//! dependency, and needs no keys or crypto provider. A hand-written parser
//! or `tls-parser` would be one more thing to trust for a security check.

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::error::EgressError;

/// Largest ClientHello accepted: a TLS record is at most 16 KiB, and a hello
/// spread over several (post-quantum key shares) stays far below this.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Reads the ClientHello from `io`. Returns every byte read (to be sent on to
/// the upstream unchanged) and the SNI it names, if any.
pub(crate) async fn read_client_hello<S: AsyncRead + Unpin>(
    io: &mut S,
) -> Result<(Vec<u8>, Option<String>), EgressError> {
    let not_tls = |detail: String| EgressError::NotTls { detail };
    let mut acceptor = Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| not_tls(e.to_string()))?;
        if n == 0 {
            return Err(not_tls("the tunnel closed before a ClientHello".into()));
        }
        seen.extend_from_slice(&chunk[..n]);
        if seen.len() > MAX_CLIENT_HELLO {
            return Err(not_tls(format!(
                "no ClientHello in {MAX_CLIENT_HELLO} bytes"
            )));
        }
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            let taken = acceptor
                .read_tls(&mut fresh)
                .map_err(|e| not_tls(e.to_string()))?;
            if taken == 0 {
                return Err(not_tls(
                    "the ClientHello does not fit rustls' buffer".into(),
                ));
            }
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return Ok((seen, sni));
            }
            Err((error, _alert)) => return Err(not_tls(error.to_string())),
        }
    }
}

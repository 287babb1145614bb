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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The first flight of a real rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        hello
    }

    #[tokio::test]
    async fn the_server_name_is_read_even_one_byte_at_a_time() {
        let hello = client_hello("api.example.com");
        let (mut tool, mut proxy) = tokio::io::duplex(1);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for byte in sent {
                tool.write_all(&[byte]).await.unwrap();
            }
            tool
        });
        let (seen, sni) = read_client_hello(&mut proxy).await.unwrap();
        assert_eq!(sni.as_deref(), Some("api.example.com"));
        assert_eq!(seen, hello, "every byte is kept for the upstream");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn anything_but_a_client_hello_is_refused() {
        for bytes in [
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec(),
            vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
            Vec::new(),
        ] {
            let err = read_client_hello(&mut bytes.as_slice()).await.unwrap_err();
            assert_eq!(err.reason(), "NotTls", "{bytes:?}");
        }
        let hello = client_hello("10.0.0.1");
        let (_, sni) = read_client_hello(&mut hello.as_slice()).await.unwrap();
        assert_eq!(sni, None, "an IP address is no server name");
    }
}

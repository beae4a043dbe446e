//! TLS on the main port: a rustls acceptor feeding the server's incoming
//! stream, with a configuration (certificate, key, client CA for mTLS)
//! that is rebuilt when its files change, without a restart. Connections
//! already open keep the configuration they were made with; new handshakes
//! take the new one. tonic hands each call the peer's certificates
//! (`TlsConnectInfo`), from which [`peer_identities`] reads the names a
//! principal may be known by.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier},
    server::TlsStream,
};

use crate::shutdown::CancellationToken;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; connections beyond it are closed
/// at once (a flood of unauthenticated handshakes cannot exhaust memory).
const MAX_HANDSHAKES: usize = 1024;

/// The files a TLS configuration is made of.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// With it, clients must present a certificate this CA signed (PEM).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }
}

/// Builds a server configuration from the files: fails if one does not
/// read or parse, or if the key does not belong to the certificate (a pair
/// replaced a moment apart).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let read = |what: &str, path: &Path| -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_slice_iter(&read("--tls-cert", &files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {} holds no certificate",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("--tls-key", &files.key)?)
        .map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&read("--tls-client-ca", path)?) {
                let ca = ca.map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
                roots
                    .add(ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert and --tls-key do not make a pair: {e}"))?;
    // gRPC is HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration new handshakes use, rebuilt when the files change.
pub struct Reloadable {
    /// The files.
    files: TlsFiles,
    /// The configuration in force.
    current: RwLock<Arc<ServerConfig>>,
    /// The files' bytes as last read, to tell a change.
    seen: Mutex<Vec<Option<Vec<u8>>>>,
}

impl Reloadable {
    /// Builds the first configuration (an error stops the server).
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, String> {
        let config = server_config(&files)?;
        let seen = read_all(&files.paths());
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(config),
            seen: Mutex::new(seen),
        }))
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the configuration if a file changed since last read (or
    /// `forced`). On failure the old one stays; it is tried again at the
    /// next change (the other half of a pair may follow a moment later).
    pub fn reload(&self, forced: bool) -> Result<bool, String> {
        let now = read_all(&self.files.paths());
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if !forced && *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(true)
    }
}

fn read_all(paths: &[&Path]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

/// Rebuilds the configuration within `interval` of a change to its files
/// and on SIGHUP, until `shutdown`.
pub async fn watch(tls: Arc<Reloadable>, interval: Duration, shutdown: CancellationToken) {
    crate::shutdown::every_change(interval, shutdown, |forced| match tls.reload(forced) {
        Ok(false) => {}
        Ok(true) => tracing::info!("TLS certificate reloaded"),
        Err(e) => {
            tracing::error!(cause = %e, "TLS certificate not reloaded; the previous one stays in force");
        }
    })
    .await;
}

/// Accepts connections on `listener` and yields them once their TLS
/// handshake (with the configuration in force) is done; handshakes run off
/// the accept loop, so a slow or failing client holds up no one else.
/// A client refused at the handshake (plaintext, no or wrong certificate)
/// is logged at debug level and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloadable>,
    shutdown: CancellationToken,
) -> impl futures_util::Stream<Item = io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            // Without TCP_NODELAY small responses wait out delayed ACKs.
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) })
}

/// The names a client certificate's leaf presents, as an auth file's
/// `certificates` lists them: its SAN URIs and SAN DNS names, or, only
/// when it has none (RFC 6125), its subject's common name. A subject with
/// more than one common name presents none.
pub fn peer_identities(leaf: &CertificateDer<'_>) -> Vec<String> {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert.valid_uri_names().map(str::to_owned).collect();
    names.extend(cert.valid_dns_names().map(str::to_owned));
    if names.is_empty() {
        names.extend(common_name(cert.subject()));
    }
    names
}

/// One DER element: its tag, its contents and what follows it.
fn der(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (len_bytes, rest) = rest.split_at_checked(count)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// The common name (OID 2.5.4.3) of a DER subject (the contents of its
/// SEQUENCE: SETs of SEQUENCEs of an OID and a value), read element by
/// element; `None` if there is not exactly one, or it is not a string.
fn common_name(subject: &[u8]) -> Option<String> {
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    let mut found = Vec::new();
    let mut sets = subject;
    while !sets.is_empty() {
        let (tag, set, rest) = der(sets)?;
        sets = rest;
        if tag != 0x31 {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (tag, attribute, rest) = der(attributes)?;
            attributes = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der(attribute)?;
            if oid_tag == 0x06 && oid == CN {
                let (value_tag, value, _) = der(value)?;
                if !matches!(value_tag, 0x0c | 0x13 | 0x16) {
                    return None;
                }
                found.push(String::from_utf8(value.to_vec()).ok()?);
            }
        }
    }
    match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(oid: &[u8], value: &str) -> Vec<u8> {
        let mut seq = vec![0x06, u8::try_from(oid.len()).unwrap()];
        seq.extend_from_slice(oid);
        seq.extend([0x0c, u8::try_from(value.len()).unwrap()]);
        seq.extend_from_slice(value.as_bytes());
        let mut set = vec![0x30, u8::try_from(seq.len()).unwrap()];
        set.extend(seq);
        let mut out = vec![0x31, u8::try_from(set.len()).unwrap()];
        out.extend(set);
        out
    }

    /// Rule: the common name is the CN attribute's value, never bytes that
    /// look like one inside another attribute; two CNs are none.
    #[test]
    fn the_common_name_is_read_by_structure() {
        let cn = [0x55, 0x04, 0x03];
        let org = [0x55, 0x04, 0x0a];
        let plain = attribute(&cn, "alice");
        assert_eq!(common_name(&plain).as_deref(), Some("alice"));
        // An organization whose value holds the bytes of a CN "admin".
        let forged =
            String::from_utf8(vec![0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05]).unwrap() + "admin";
        let mut spoof = attribute(&org, &forged);
        spoof.extend(attribute(&cn, "alice"));
        assert_eq!(common_name(&spoof).as_deref(), Some("alice"));
        let mut two = attribute(&cn, "alice");
        two.extend(attribute(&cn, "bob"));
        assert_eq!(common_name(&two), None);
        assert_eq!(common_name(&[0x31, 0x05, 0x30]), None, "truncated");
    }
}

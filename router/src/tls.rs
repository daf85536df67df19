//! Certificates for the TLS and QUIC listeners, chosen by SNI from
//! `[[tls]]`, swappable on reload without touching open connections.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use stoke_config::{HostPattern, TlsCert};

/// The certificates of one snapshot, ready for handshakes.
pub struct CertStore {
    entries: Vec<(Vec<HostPattern>, Arc<CertifiedKey>)>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("entries", &self.entries.len()).finish()
    }
}

impl CertStore {
    /// Load every `[[tls]]` entry; the error names the file whose key
    /// rustls cannot use.
    pub fn build(certs: &[TlsCert]) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(certs.len());
        for cert in certs {
            let key = any_supported_type(&cert.key)
                .map_err(|e| format!("{}: the key cannot sign TLS handshakes: {e}", cert.key_path.display()))?;
            let certified = CertifiedKey::new(cert.chain.clone(), key);
            if let Err(e) = certified.keys_match() {
                // Not every key type can be checked; only a definite mismatch is fatal.
                if !matches!(e, rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) {
                    return Err(format!(
                        "{} and {}: the key does not belong to the certificate: {e}",
                        cert.cert_path.display(),
                        cert.key_path.display()
                    ));
                }
            }
            entries.push((cert.hosts.clone(), Arc::new(certified)));
        }
        Ok(CertStore { entries })
    }

    /// Whether there are no certificates.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The certificate for `sni`: an exact host, then the longest wildcard,
    /// then a `*` entry, then the first certificate.
    pub fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let mut best: Option<(usize, &Arc<CertifiedKey>)> = None;
            for (hosts, key) in &self.entries {
                for h in hosts {
                    let rank = match h {
                        HostPattern::Exact(e) if *e == name => usize::MAX,
                        HostPattern::Suffix(s) if h.matches(&name) => s.len(),
                        _ => continue,
                    };
                    if best.is_none_or(|(r, _)| rank > r) {
                        best = Some((rank, key));
                    }
                }
            }
            if let Some((_, key)) = best {
                return Some(key.clone());
            }
        }
        self.entries
            .iter()
            .find(|(hosts, _)| hosts.contains(&HostPattern::Any))
            .or_else(|| self.entries.first())
            .map(|(_, k)| k.clone())
    }
}

/// The SNI resolver given to rustls; [`swap`](Self::swap) replaces the
/// certificates for new handshakes.
#[derive(Debug)]
pub struct CertResolver {
    store: ArcSwap<CertStore>,
}

impl CertResolver {
    /// A resolver over `store`.
    pub fn new(store: CertStore) -> Arc<Self> {
        Arc::new(CertResolver { store: ArcSwap::from_pointee(store) })
    }

    /// New handshakes use `store`.
    pub fn swap(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().find(hello.server_name())
    }
}

/// A rustls server config (TLS 1.2 and 1.3, ring) using `resolver`,
/// offering `alpn` protocols in order.
pub fn server_config(resolver: Arc<CertResolver>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

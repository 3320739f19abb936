//! TLS for NBD over TCP (rustls, ring provider): loading a certificate chain and key from PEM.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {why}; give a PEM file")]
    Pem {
        /// Certificate or key.
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the pair.
    #[error("certificate {cert} and key {key} do not make a TLS server: {source}")]
    Config {
        /// Certificate file.
        cert: String,
        /// Key file.
        key: String,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
}

/// A TLS server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem = |what, path: &Path, why: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem("the certificate", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem("the certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("the certificate", cert, "no CERTIFICATE block".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| pem("the private key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|source| TlsError::Config {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source,
        })?;
    Ok(Arc::new(config))
}

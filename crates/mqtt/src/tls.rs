//! TLS for the session: verify the broker against a configured CA, present a client
//! certificate, and explain the usual failures (unknown CA, expired, wrong host) plainly.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::MqttError;

/// Certificate files (PEM) for `mqtts://`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// This client's certificate; with `key`, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// This client's private key.
    pub key: Option<PathBuf>,
    /// ALPN protocols, e.g. `x-amzn-mqtt-ca` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
}

fn tls_error(
    what: &str,
    path: &std::path::Path,
    cause: impl std::error::Error + Send + Sync + 'static,
) -> MqttError {
    MqttError::Tls {
        what: format!("{what} {}", path.display()),
        cause: Some(Box::new(cause)),
    }
}

impl TlsFiles {
    /// The files of a service's `ca`/`cert`/`key`/`alpn` settings; `None` without a CA.
    pub fn from_settings(
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        alpn: Option<&String>,
    ) -> Option<TlsFiles> {
        ca.map(|ca| TlsFiles {
            ca: ca.clone(),
            cert: cert.cloned(),
            key: key.cloned(),
            alpn: alpn.into_iter().cloned().collect(),
        })
    }

    /// Builds the rustls configuration, reading and checking every file.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, MqttError> {
        let mut roots = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&self.ca)
            .map_err(|e| tls_error("CA file", &self.ca, e))?;
        for ca in cas {
            let ca = ca.map_err(|e| tls_error("CA file", &self.ca, e))?;
            roots
                .add(ca)
                .map_err(|e| tls_error("CA file", &self.ca, e))?;
        }
        if roots.is_empty() {
            return Err(MqttError::Tls {
                what: format!("CA file {}: no certificate in it", self.ca.display()),
                cause: None,
            });
        }
        // An explicit provider: no process-wide default to install or to conflict over.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MqttError::Tls {
                what: "protocol versions".into(),
                cause: Some(Box::new(e)),
            })?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| tls_error("certificate", cert, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls_error("certificate", cert, e))?;
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error("key", key, e))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| tls_error("certificate and key", cert, e))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(MqttError::Tls {
                    what: "a client certificate and its key go together: give both or neither"
                        .into(),
                    cause: None,
                });
            }
        };
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// A plain-words reading of a TLS failure, for the log.
pub fn explain(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    // BadSignature: a CA with the same name but another key signed it.
    if e.contains("unknownissuer") || e.contains("unknown issuer") || e.contains("badsignature") {
        Some("the broker's certificate is not signed by the configured CA")
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        Some("the broker's certificate does not name the host in the broker address")
    } else if e.contains("expired") {
        Some("a certificate has expired")
    } else if e.contains("certificate required") || e.contains("certificaterequired") {
        Some("the broker wants a client certificate: set cert and key")
    } else if e.contains("bad certificate") || e.contains("badcertificate") {
        Some("the broker refused this client's certificate")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS server on a loopback port that completes one handshake and tells which ALPN
    /// protocol was agreed: AWS IoT Core on port 443 takes MQTT only with `x-amzn-mqtt-ca`.
    fn alpn_seen_by_a_server(alpn: Option<&str>) -> Option<Vec<u8>> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        use rustls::pki_types::PrivatePkcs8KeyDer;

        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap();
        server.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();

        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            alpn: alpn.into_iter().map(String::from).collect(),
            ..TlsFiles::default()
        };
        let client = std::thread::spawn(move || {
            let mut conn =
                rustls::ClientConnection::new(files.client_config().unwrap(), addr.ip().into())
                    .unwrap();
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).unwrap();
            }
        });
        let (mut tcp, _) = listener.accept().unwrap();
        let mut conn = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        client.join().unwrap();
        conn.alpn_protocol().map(<[u8]>::to_vec)
    }

    #[test]
    fn offers_the_configured_alpn_protocol_in_the_handshake() {
        assert_eq!(
            alpn_seen_by_a_server(Some("x-amzn-mqtt-ca")),
            Some(b"x-amzn-mqtt-ca".to_vec())
        );
        assert_eq!(alpn_seen_by_a_server(None), None);
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            ..TlsFiles::default()
        };
        let err = files.client_config().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn explains_the_usual_failures() {
        assert!(
            explain("invalid peer certificate: UnknownIssuer")
                .unwrap()
                .contains("CA")
        );
        assert!(
            explain("invalid peer certificate: NotValidForName")
                .unwrap()
                .contains("host")
        );
        assert!(
            explain("invalid peer certificate: Expired")
                .unwrap()
                .contains("expired")
        );
        assert_eq!(explain("connection refused"), None);
    }
}

//! Test certificates: a CA made with rcgen, leaf certificates it signs (valid, expired, for
//! other names, for clients), written to a temporary directory as PEM files, and the rustls
//! settings the tests' own clients and replicas use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::TempDir;

/// A certificate authority and the directory its files go to.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub dir: TempDir,
}

/// A leaf certificate and its key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a leaf certificate is for, and when it is valid.
pub struct Leaf<'a> {
    /// DNS names, or IP addresses.
    pub names: &'a [&'a str],
    pub expired: bool,
    pub client: bool,
}

impl Leaf<'_> {
    pub fn server<'a>(names: &'a [&'a str]) -> Leaf<'a> {
        Leaf {
            names,
            expired: false,
            client: false,
        }
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("wsrouter test CA {name}"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            ca,
            dir: TempDir::new(&format!("pki-{name}")),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The CA certificate, written to `ca.pem`.
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.0.join("ca.pem");
        std::fs::write(&path, self.ca_pem()).unwrap();
        path
    }

    pub fn issue(&self, leaf: Leaf<'_>) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for name in leaf.names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            });
        }
        params.distinguished_name.push(
            DnType::CommonName,
            leaf.names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![if leaf.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if leaf.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Write `issued` as `{stem}.crt` and `{stem}.key`; their paths.
    pub fn write(&self, issued: &Issued, stem: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.0.join(format!("{stem}.crt"));
        let key = self.dir.0.join(format!("{stem}.key"));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        (cert, key)
    }

    /// Trust this CA only.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }

    /// A client's TLS settings trusting this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(wsrouter::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }
}

fn der(issued: &Issued) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    (certs, key)
}

/// A replica's TLS settings: serve `issued`, and when `clients` is given, require a client
/// certificate signed by that CA.
pub fn server_config(issued: &Issued, clients: Option<&Pki>) -> Arc<rustls::ServerConfig> {
    let (certs, key) = der(issued);
    let builder = rustls::ServerConfig::builder_with_provider(wsrouter::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                wsrouter::tls::provider(),
            )
            .build()
            .unwrap(),
        ),
    };
    Arc::new(builder.with_single_cert(certs, key).unwrap())
}

/// A TLS connection to `addr`, verified as `name` with `config`.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

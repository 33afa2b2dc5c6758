//! TLS: one crypto provider (ring), installed explicitly; PEM loading; dev PKI generation.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The one crypto provider of the process. Two providers in the dependency tree make rustls
/// panic at first use unless one is installed explicitly, so every entry point calls this.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read certificate file {}", path.display()))?;
    certs_from_pem(&pem, &path.display().to_string())
}

/// The certificates in `pem` (`what` names it in errors); none is an error.
fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what} is not a PEM certificate file"))?;
    if certs.is_empty() {
        return Err(anyhow!("{what} contains no certificate"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{} is not a PEM key file", path.display()))?
        .ok_or_else(|| anyhow!("{} contains no private key", path.display()))
}

pub fn root_store(ca: &Path) -> Result<rustls::RootCertStore> {
    roots_of(load_certs(ca)?, &ca.display().to_string())
}

fn roots_of(certs: Vec<CertificateDer<'static>>, what: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).with_context(|| format!("{what} holds an unusable CA certificate"))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The API port's TLS: this node's (renewable) certificate, no client certificates.
pub fn server_config(node_cert: Arc<NodeCert>) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(node_cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// This node's certificate and key, behind every TLS config that presents them (the API port,
/// the cluster port, outbound cluster calls). Swappable at run time: a renewed certificate is
/// presented on new connections without a restart.
#[derive(Debug)]
pub struct NodeCert {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl NodeCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<NodeCert>> {
        let current = std::sync::RwLock::new(Arc::new(certified_key(cert, key)?));
        Ok(Arc::new(NodeCert { current }))
    }

    /// Reads the files again (after they were replaced) and presents them from now on.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<()> {
        let fresh = Arc::new(certified_key(cert, key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    CertifiedKey::from_der(load_certs(cert)?, load_key(key)?, &provider())
        .with_context(|| format!("{} and {} do not hold a matching certificate and key", cert.display(), key.display()))
}

impl rustls::server::ResolvesServerCert for NodeCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for NodeCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client config trusting only the CA certificates in `pem` (an alert sink's `ca_file`).
pub fn client_config_from_pem(pem: &[u8], what: &str) -> Result<rustls::ClientConfig> {
    client_config_trusting(roots_of(certs_from_pem(pem, what)?, what)?)
}

/// A client config trusting only `ca` (never the system roots: a vault trusts its own CA).
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig> {
    client_config_trusting(root_store(ca)?)
}

fn client_config_trusting(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A cluster certificate authority: issues node certificates.
pub struct DevPki {
    pub ca_cert_pem: String,
    pub common_name: String,
    ca_key_pem: String,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca_params(common_name: &str) -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl DevPki {
    pub fn generate(cluster_name: &str) -> Result<DevPki> {
        let common_name = format!("{cluster_name} CA");
        let params = ca_params(&common_name)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevPki {
            ca_cert_pem: cert.pem(),
            common_name,
            ca_key_pem: key.serialize_pem(),
            ca: rcgen::Issuer::new(params, key),
        })
    }

    /// The issuer of an existing CA, from its name and key (as the cluster stores them).
    pub fn from_key(common_name: &str, cert_pem: &str, key_pem: &str) -> Result<DevPki> {
        let key = rcgen::KeyPair::from_pem(key_pem).context("the cluster CA key is not a PEM private key")?;
        Ok(DevPki {
            ca_cert_pem: cert_pem.to_string(),
            common_name: common_name.to_string(),
            ca_key_pem: key_pem.to_string(),
            ca: rcgen::Issuer::new(ca_params(common_name)?, key),
        })
    }

    pub fn ca_key_pem(&self) -> &str {
        &self.ca_key_pem
    }

    /// A node certificate for ServerAuth and ClientAuth with SANs for `names` (IPs or DNS names),
    /// valid for `DEFAULT_CERT_VALIDITY_DAYS`. Returns (cert PEM, key PEM).
    pub fn node_cert(&self, common_name: &str, names: &[String]) -> Result<(String, String)> {
        self.node_cert_valid_for(common_name, names, DEFAULT_CERT_VALIDITY_DAYS)
    }

    /// As `node_cert`, valid from an hour ago (peers' clocks differ a little) for `days` days,
    /// with a random serial (the deny list revokes by serial).
    pub fn node_cert_valid_for(&self, common_name: &str, names: &[String], days: u32) -> Result<(String, String)> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let (not_before, not_after) = validity_window(std::time::SystemTime::now(), days)?;
        // rcgen takes `time`'s dates, built here from its own epoch so this crate needs no `time`.
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + not_before;
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + not_after;
        let mut serial: [u8; 16] = crate::ids::random_bytes();
        // Positive, and without a leading zero octet, so it reads back as it was written.
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// How long a node certificate is valid unless `tls.cert_validity_days` says otherwise.
pub const DEFAULT_CERT_VALIDITY_DAYS: u32 = 365;

/// A certificate's validity, [now - 1 hour, now + days], as times since the Unix epoch.
fn validity_window(now: std::time::SystemTime, days: u32) -> Result<(Duration, Duration)> {
    let since_epoch = now.duration_since(std::time::UNIX_EPOCH).context("the clock is before 1970")?;
    let not_before = since_epoch.saturating_sub(Duration::from_secs(3600));
    let not_after = since_epoch + Duration::from_secs(u64::from(days) * 86_400);
    Ok((not_before, not_after))
}

/// Writes a file readable by its owner only (keys, tokens, snapshots): mode 0600, also when it
/// existed with a looser one, and never through a symbolic link (§8.4).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file =
        citadel_storage::files::open_private(path, std::fs::OpenOptions::new().write(true).create(true).truncate(true))
            .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_are_valid_from_an_hour_ago_for_the_days_asked_only() {
        install_crypto_provider();
        let pki = DevPki::generate("test").unwrap();
        let now_s = crate::ids::now_ms() / 1000;
        for days in [DEFAULT_CERT_VALIDITY_DAYS, 7] {
            let (pem, _) = pki.node_cert_valid_for("node-1", &["127.0.0.1".into()], days).unwrap();
            let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let not_before = cert.validity().not_before.timestamp() as u64;
            let not_after = cert.validity().not_after.timestamp() as u64;
            assert!(not_before.abs_diff(now_s - 3600) <= 5, "valid from an hour ago");
            let expected = now_s + u64::from(days) * 86_400;
            assert!(not_after.abs_diff(expected) <= 5, "valid for {days} days, not for ever");
        }
        let (pem, _) = pki.node_cert("node-1", &["127.0.0.1".into()]).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let days = (cert.validity().not_after.timestamp() as u64 - now_s) / 86_400;
        assert_eq!(days, u64::from(DEFAULT_CERT_VALIDITY_DAYS), "dev certificates expire in a year");
    }
}

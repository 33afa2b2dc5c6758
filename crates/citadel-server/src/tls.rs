//! TLS: one crypto provider (ring), installed explicitly; PEM loading; dev PKI generation.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The one crypto provider of the process. Two providers in the dependency tree make rustls
/// panic at first use unless one is installed explicitly, so every entry point calls this.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} contains no certificate", path.display()));
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
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).with_context(|| format!("{} holds an unusable CA certificate", ca.display()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config trusting only `ca` (never the system roots: a vault trusts its own CA).
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca)?)
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

    /// A node certificate for ServerAuth and ClientAuth with SANs for `names` (IPs or DNS names).
    /// Returns (cert PEM, key PEM).
    pub fn node_cert(&self, common_name: &str, names: &[String]) -> Result<(String, String)> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
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

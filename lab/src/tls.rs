//! x509 certificates for QEMU's native TLS migration stream (`vmbeam migrate --tls`, libvirt's
//! `VIR_MIGRATE_TLS`): one CA per lab and, per cloud VM, a server and a client certificate in
//! the layout libvirt's `migrate_tls_x509_cert_dir` expects. The encrypted baselines of
//! `vmbeam-lab bench` (nested-like, blanket-like) use them.
//!
//! Generated with `rcgen` (no `certtool`/`openssl` run): ECDSA P-256 keys, the server
//! certificate naming the cloud VM both by host name and by its cloud-network address, since
//! QEMU checks the destination's certificate against the host of the migration URI.

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::LabError;

/// Where the certificates are inside a cloud VM (`qemu.conf`'s `migrate_tls_x509_cert_dir`).
pub const CERT_DIR_INNER: &str = "/etc/libvirt/pki-qemu";

/// The lab's certificate authority.
pub struct LabCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn tls_err(what: &str) -> impl FnOnce(rcgen::Error) -> LabError + '_ {
    move |e| LabError::Setup(format!("TLS certificates: {what}: {e}"))
}

impl LabCa {
    /// A new CA (valid from yesterday for ten years; the lab lives minutes).
    pub fn new() -> Result<LabCa, LabError> {
        let key = KeyPair::generate().map_err(tls_err("CA key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err("CA params"))?;
        p.distinguished_name
            .push(DnType::CommonName, "VMBeam lab CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p);
        let cert = p.self_signed(&key).map_err(tls_err("CA certificate"))?;
        Ok(LabCa { cert, key })
    }

    /// Writes `ca-cert.pem`, `server-{cert,key}.pem` and `client-{cert,key}.pem` for the cloud
    /// VM `name` at `addr` into `dir` (keys 0600).
    pub fn write_host_certs(&self, dir: &Path, name: &str, addr: &str) -> Result<(), LabError> {
        let write = |file: &str, content: &str, private: bool| -> Result<(), LabError> {
            let p = dir.join(file);
            if private {
                crate::sys::write_private(&p, content)
                    .map_err(|e| LabError::io(format!("write {}", p.display()), e))
            } else {
                fs::write(&p, content)
                    .map_err(|e| LabError::io(format!("write {}", p.display()), e))
            }
        };
        write("ca-cert.pem", &self.cert.pem(), false)?;
        for (role, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().map_err(tls_err("host key"))?;
            let mut p = CertificateParams::new(vec![name.to_string(), addr.to_string()])
                .map_err(tls_err("host params"))?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![purpose];
            validity(&mut p);
            let cert = p
                .signed_by(&key, &self.cert, &self.key)
                .map_err(tls_err("host certificate"))?;
            write(&format!("{role}-cert.pem"), &cert.pem(), false)?;
            write(&format!("{role}-key.pem"), &key.serialize_pem(), true)?;
        }
        Ok(())
    }
}

fn validity(p: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let at = |s: i64| rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(s as u64);
    p.not_before = at(now - 86_400);
    p.not_after = at(now + 10 * 365 * 86_400);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_files_libvirt_expects() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LabCa::new().unwrap();
        ca.write_host_certs(dir.path(), "cvm1", "198.18.0.11")
            .unwrap();
        for f in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            let s = fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(s.starts_with("-----BEGIN "), "{f}: {s}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("server-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

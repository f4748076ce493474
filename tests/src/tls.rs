//! Private certificate authorities and server certificates for HTTPS registries in tests, made
//! with the `openssl` command (as an operator would).

use crate::util;
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args).current_dir(dir);
    util::run_checked(&mut cmd, Duration::from_secs(60))?;
    Ok(())
}

/// A CA: `NAME.pem` and `NAME.key` in `dir`.
pub struct Ca {
    pub pem: PathBuf,
    key: PathBuf,
}

impl Ca {
    /// A new self-signed CA called `name`, valid for two days.
    pub fn new(dir: &Path, name: &str) -> Result<Ca> {
        let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &key,
                "-out",
                &pem,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        Ok(Ca {
            pem: dir.join(pem),
            key: dir.join(key),
        })
    }

    /// A server certificate for 127.0.0.1 signed by this CA, with a key of its own, written
    /// to `cert` and `key` (replacing what is there).
    pub fn issue_for_localhost(&self, cert: &Path, key: &Path) -> Result<()> {
        let dir = cert.parent().unwrap_or(Path::new("."));
        let csr = cert.with_extension("csr");
        let ext = cert.with_extension("ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        )?;
        let s = |p: &Path| p.display().to_string();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &s(key),
                "-out",
                &s(&csr),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&self.pem),
                "-CAkey",
                &s(&self.key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&ext),
                "-out",
                &s(cert),
            ],
        )
    }
}

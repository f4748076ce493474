//! A real OCI registry (Debian's `docker-registry`, Distribution 2.8) on 127.0.0.1, one per test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use crate::util::{self, ChildGuard};

/// How long [`Registry::start`] waits for `GET /v2/` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One line of the registry's access log (Apache combined format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path with query, e.g. `/v2/repo/blobs/sha256:...`.
    pub path: String,
    /// Response status, e.g. 200 or 206 (a Range request answered partially).
    pub status: u16,
    /// Response body size in bytes (0 when the log shows `-`).
    pub bytes: u64,
}

impl AccessEntry {
    /// True for a GET of a blob (`/v2/<repo>/blobs/<digest>`).
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET"
            && self.path.starts_with("/v2/")
            && self.path.contains("/blobs/sha256:")
    }
}

/// A running `docker-registry` with its own storage, config and log in a temporary directory.
/// Dropping it kills the process (by PID) and removes the directory.
#[derive(Debug)]
pub struct Registry {
    child: ChildGuard,
    dir: Option<tempfile::TempDir>,
    addr: String,
    log_path: PathBuf,
    credentials: Option<(String, String)>,
    tls: bool,
}

impl Registry {
    /// Starts a registry without authentication.
    pub fn start() -> Result<Registry> {
        Self::start_inner(None, None, None)
    }

    /// Starts a registry (no auth) that sends its events (Distribution's notifications) to
    /// `url`, with `Authorization: Bearer TOKEN` when a token is given. It retries every
    /// second while the endpoint is down, as a registry configured by the docs does.
    pub fn start_with_notifications(url: &str, token: Option<&str>) -> Result<Registry> {
        Self::start_inner(None, None, Some((url.to_string(), token.map(String::from))))
    }

    /// Starts a registry serving HTTPS with the PEM certificate and key given (no auth).
    /// `get` and the access-log helpers still work; readiness is a TCP connect.
    pub fn start_with_tls(cert: &Path, key: &Path) -> Result<Registry> {
        Self::start_inner(None, Some((cert.to_path_buf(), key.to_path_buf())), None)
    }

    /// Starts a registry that requires HTTP basic auth with `user`/`pass` (htpasswd, bcrypt).
    pub fn start_with_basic_auth(user: &str, pass: &str) -> Result<Registry> {
        Self::start_inner(Some((user.to_string(), pass.to_string())), None, None)
    }

    fn start_inner(
        credentials: Option<(String, String)>,
        tls: Option<(PathBuf, PathBuf)>,
        notify: Option<(String, Option<String>)>,
    ) -> Result<Registry> {
        // The free port can be taken by someone else before the registry binds it: retry.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(credentials.clone(), tls.clone(), notify.clone()) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let text = format!("{e:#}");
                    if !text.contains("address already in use") {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn try_start(
        credentials: Option<(String, String)>,
        tls: Option<(PathBuf, PathBuf)>,
        notify: Option<(String, Option<String>)>,
    ) -> Result<Registry> {
        let dir = util::short_tempdir()?;
        let data = dir.path().join("data");
        fs::create_dir(&data).with_context(|| format!("creating {}", data.display()))?;
        let port = util::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let log_path = dir.path().join("registry.log");

        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: beam-test-secret\n\
             \x20 headers:\n    X-Content-Type-Options: [nosniff]\n",
            data = data.display(),
        );
        if let Some((cert, key)) = &tls {
            config.push_str(&format!(
                "\x20 tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, pass)) = &credentials {
            if user.contains(':') || user.contains('\n') {
                bail!("registry user name {user:?} cannot contain ':' or a newline");
            }
            let hash =
                bcrypt::hash(pass, 4).context("hashing the registry password with bcrypt")?;
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{user}:{hash}\n"))
                .with_context(|| format!("writing {}", htpasswd.display()))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: beam-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some((url, token)) = &notify {
            // The same endpoint block docs/autoconvert.md tells operators to paste.
            config.push_str(&format!(
                "notifications:\n  events:\n    includereferences: true\n  endpoints:\n    - name: beam\n      url: {url}\n      timeout: 5s\n      threshold: 3\n      backoff: 1s\n      ignore:\n        mediatypes:\n          - application/octet-stream\n        actions:\n          - pull\n"
            ));
            if let Some(t) = token {
                config.push_str(&format!(
                    "      headers:\n        Authorization: [\"Bearer {t}\"]\n"
                ));
            }
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, &config)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let child = spawn_registry(&config_path, &log_path)?;
        let mut registry = Registry {
            child,
            dir: Some(dir),
            addr,
            log_path,
            credentials,
            tls: tls.is_some(),
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    /// Stops the registry (by PID) and starts it again with the same configuration, address
    /// and storage: it reads its TLS certificate and key files again, so a test can change
    /// them in place (a renewed or a replaced certificate).
    pub fn restart(&mut self) -> Result<()> {
        self.child.stop(Duration::from_secs(10));
        let dir = self
            .dir
            .as_ref()
            .context("a registry without its directory")?;
        self.child = spawn_registry(&dir.path().join("config.yml"), &self.log_path)?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "docker-registry exited early ({status}); log tail:\n{}",
                    util::tail_file(&self.log_path, 40)
                );
            }
            if self.tls {
                if std::net::TcpStream::connect(&self.addr).is_ok() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "docker-registry (TLS) at {} did not listen within {READY_TIMEOUT:?}; log tail:\n{}",
                        self.addr,
                        util::tail_file(&self.log_path, 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let last = match self.get("/v2/") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", String::from_utf8_lossy(&body)),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "docker-registry at {} did not answer GET /v2/ with 200 within {READY_TIMEOUT:?} \
                     (last: {last}); log tail:\n{}",
                    self.addr,
                    util::tail_file(&self.log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id of the registry.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The temporary directory holding config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new(""))
    }

    /// The user and password, for a registry started with basic auth.
    pub fn credentials(&self) -> Option<(String, String)> {
        self.credentials.clone()
    }

    /// `user:pass` (for `ctr --user`, `skopeo --dest-creds`), for a registry with basic auth.
    pub fn user_colon_pass(&self) -> Option<String> {
        self.credentials.as_ref().map(|(u, p)| format!("{u}:{p}"))
    }

    /// The log file path (stdout and stderr of the registry: access log and application log).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the registry logged so far: the access log (one line per request, Apache
    /// combined format) interleaved with its application log.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The access log parsed into entries, in order.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        self.log().lines().filter_map(parse_access_line).collect()
    }

    /// GETs of blobs so far (status 200 for whole blobs, 206 for Range requests).
    pub fn blob_gets(&self) -> Vec<AccessEntry> {
        self.access_log()
            .into_iter()
            .filter(|e| e.is_blob_get())
            .collect()
    }

    /// A blob (or manifest) by digest, read from the registry's own storage, not over HTTP.
    pub fn stored_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64)
            .with_context(|| format!("{digest} is not a sha256 digest"))?;
        let path = self.dir().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ));
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The digest `repo:tag` names, from the registry's storage.
    pub fn stored_tag(&self, repo: &str, tag: &str) -> Result<String> {
        let link = self.dir().join(format!(
            "data/docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}/current/link"
        ));
        Ok(fs::read_to_string(&link)
            .with_context(|| format!("reading {}", link.display()))?
            .trim()
            .to_string())
    }

    /// Every manifest stored in `repo` (tagged or not), by digest, sorted.
    pub fn stored_manifests(&self, repo: &str) -> Result<Vec<String>> {
        let revisions = self.dir().join(format!(
            "data/docker/registry/v2/repositories/{repo}/_manifests/revisions/sha256"
        ));
        let entries = match fs::read_dir(&revisions) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", revisions.display())),
        };
        let mut out = Vec::new();
        for e in entries {
            out.push(format!("sha256:{}", e?.file_name().to_string_lossy()));
        }
        out.sort();
        Ok(out)
    }

    /// A GET against the registry (with basic auth if configured): `(status, body)`.
    /// Non-2xx answers are returned, not errors; only transport failures are errors.
    pub fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        self.get_with_auth(
            path,
            self.credentials
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.as_str())),
        )
    }

    /// A GET with explicit credentials (or none), e.g. to check that auth is enforced.
    pub fn get_with_auth(&self, path: &str, auth: Option<(&str, &str)>) -> Result<(u16, Vec<u8>)> {
        let url = format!("{}{}", self.url(), path);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let mut req = agent.get(&url);
        if let Some((u, p)) = auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req = req.set("Authorization", &format!("Basic {token}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(anyhow::Error::new(e)).with_context(|| format!("GET {url}")),
        };
        let status = resp.status();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut body)
            .with_context(|| format!("reading the body of GET {url}"))?;
        Ok((status, body))
    }

    /// PUT a manifest or index as `repo:reference` (a tag or its digest).
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<()> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        match ureq::put(&url)
            .set("Content-Type", media_type)
            .send_bytes(body)
        {
            Ok(r) if r.status() == 201 => Ok(()),
            Ok(r) => bail!("PUT {url}: {}", r.status()),
            Err(ureq::Error::Status(code, r)) => {
                bail!("PUT {url}: {code} {}", r.into_string().unwrap_or_default())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// GET a manifest or index, accepting the OCI media types (Distribution answers 404 to a
    /// client that does not): `(status, body)`.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<(u16, Vec<u8>)> {
        let resp = ureq::get(&format!("{}/v2/{repo}/manifests/{reference}", self.url()))
            .set(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
            )
            .call();
        match resp {
            Ok(r) => {
                let status = r.status();
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut r.into_reader(), &mut body)?;
                Ok((status, body))
            }
            Err(ureq::Error::Status(code, _)) => Ok((code, Vec::new())),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.child.kill();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = util::cleanup_dir(&path) {
                eprintln!("beam-tests: cleaning up registry dir: {e:#}");
                // Keep TempDir from deleting through a mount.
                let _ = dir.keep();
            }
        }
    }
}

/// Parses `127.0.0.1 - - [date] "GET /path HTTP/1.1" 200 123 "referer" "agent"`.
fn parse_access_line(line: &str) -> Option<AccessEntry> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split(' ');
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    if !req.next()?.starts_with("HTTP/") {
        return None;
    }
    let mut after = rest[end + 1..].split_whitespace();
    let status = after.next()?.parse().ok()?;
    let bytes = after.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    Some(AccessEntry {
        method,
        path,
        status,
        bytes,
    })
}

/// Starts `docker-registry serve CONFIG`, logging to `log_path`.
fn spawn_registry(config_path: &Path, log_path: &Path) -> Result<ChildGuard> {
    let bin = util::tool_path(
        "BEAM_REGISTRY_BIN",
        "docker-registry",
        "/usr/bin/docker-registry",
    );
    let (stdout, stderr) = util::log_stdio(log_path)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg(config_path)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    ChildGuard::spawn("docker-registry", &mut cmd).with_context(|| {
        format!(
            "is {} installed (Debian package docker-registry)?",
            bin.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_log_lines() {
        let line = r#"127.0.0.1 - - [27/Nov/2025:02:40:00 +0000] "GET /v2/a/blobs/sha256:ab HTTP/1.1" 206 4096 "" "containerd/1.6""#;
        let e = parse_access_line(line).unwrap();
        assert_eq!(e.method, "GET");
        assert_eq!(e.path, "/v2/a/blobs/sha256:ab");
        assert_eq!(e.status, 206);
        assert_eq!(e.bytes, 4096);
        assert!(e.is_blob_get());
        assert!(parse_access_line("time=\"...\" level=info msg=\"response completed\"").is_none());
    }

    #[test]
    fn registry_starts_answers_and_stops() {
        let reg = Registry::start().unwrap();
        let pid = reg.pid();
        let dir = reg.dir().to_path_buf();
        let (status, _) = reg.get("/v2/").unwrap();
        assert_eq!(status, 200);
        assert!(
            reg.access_log()
                .iter()
                .any(|e| e.path == "/v2/" && e.status == 200),
            "{}",
            reg.log()
        );
        drop(reg);
        assert!(!crate::util::pid_alive(pid));
        assert!(!dir.exists());
    }

    #[test]
    fn basic_auth_is_enforced() {
        let reg = Registry::start_with_basic_auth("alice", "s3cret").unwrap();
        assert_eq!(reg.get("/v2/").unwrap().0, 200);
        assert_eq!(reg.get_with_auth("/v2/", None).unwrap().0, 401);
        assert_eq!(
            reg.get_with_auth("/v2/", Some(("alice", "wrong")))
                .unwrap()
                .0,
            401
        );
    }
}

//! `beam autoconvert`, started as users start it (the built `beam` binary, flags only), with
//! its own state directory and port, stopped by PID.

use crate::util::{self, ChildGuard};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running `beam autoconvert`.
pub struct AutoConvert {
    child: ChildGuard,
    listen: String,
    log: PathBuf,
    token_file: Option<PathBuf>,
}

impl AutoConvert {
    /// Start `beam autoconvert --listen LISTEN --registry REGISTRY --plain-http --state STATE`
    /// plus `extra`, and wait for `GET /healthz`.
    pub fn start(
        listen: &str,
        registry: &str,
        state: &Path,
        token_file: Option<&Path>,
        extra: &[&str],
    ) -> Result<AutoConvert> {
        let bin = util::cargo_bin("beam")?;
        std::fs::create_dir_all(state)?;
        let log = state.with_extension(format!(
            "log-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let (out, err) = util::log_stdio(&log)?;
        let mut cmd = Command::new(bin);
        cmd.args(["autoconvert", "--listen", listen, "--registry", registry])
            .arg("--plain-http")
            .arg("--state")
            .arg(state);
        if let Some(t) = token_file {
            cmd.arg("--token-file").arg(t);
        }
        cmd.args(extra)
            .env("BEAM_LOG", "beam=info")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = ChildGuard::spawn("beam autoconvert", &mut cmd)?;
        let mut me = AutoConvert {
            child,
            listen: listen.to_string(),
            log,
            token_file: token_file.map(Path::to_path_buf),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = me.child.try_wait()? {
                bail!("beam autoconvert exited early ({st}):\n{}", me.log());
            }
            if let Ok((200, _)) = me.get("/healthz") {
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("beam autoconvert did not answer /healthz:\n{}", me.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `http://LISTEN`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        util::tail_file(&self.log, 200)
    }

    /// kill -9, as a crash.
    pub fn kill9(mut self) {
        self.child.kill();
    }

    /// A GET of `path`: `(status, body)`.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        match agent.get(&format!("{}{path}", self.url())).call() {
            Ok(r) => Ok((r.status(), r.into_string()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string()?)),
            Err(e) => Err(e.into()),
        }
    }

    /// A POST to `/events` with `auth` as the Authorization header: `(status, body)`.
    pub fn post_event(&self, body: &str, auth: Option<&str>) -> Result<(u16, String)> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let mut req = agent.post(&format!("{}/events", self.url())).set(
            "Content-Type",
            "application/vnd.docker.distribution.events.v1+json",
        );
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        match req.send_string(body) {
            Ok(r) => Ok((r.status(), r.into_string()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string()?)),
            Err(e) => Err(e.into()),
        }
    }

    /// `beam autoconvert status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let mut args = vec![
            "autoconvert".to_string(),
            "status".into(),
            "--listen".into(),
            self.listen.clone(),
            "--json".into(),
        ];
        if let Some(t) = &self.token_file {
            args.push("--token-file".into());
            args.push(t.display().to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = crate::beam::ok(&refs)?;
        serde_json::from_str(&out).with_context(|| format!("status printed {out}"))
    }

    /// The last result recorded for `repo:tag`, if any.
    pub fn result(&self, repo: &str, tag: &str) -> Result<Option<serde_json::Value>> {
        let s = self.status()?;
        Ok(s["results"].as_array().and_then(|rs| {
            rs.iter()
                .find(|r| r["repository"] == repo && r["tag"] == tag)
                .cloned()
        }))
    }
}

/// The Beam artifacts (manifests with Beam's artifact type) stored in `repo` of `registry`:
/// read from the registry's own files, so a duplicate that no tag or referrer names is counted
/// too.
pub fn beam_artifacts_in_storage(registry: &crate::Registry, repo: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for digest in registry.stored_manifests(repo)? {
        let v: serde_json::Value =
            serde_json::from_slice(&registry.stored_blob(&digest)?).unwrap_or_default();
        if v["artifactType"] == "application/vnd.beam.image.v1" {
            out.push(digest);
        }
    }
    Ok(out)
}

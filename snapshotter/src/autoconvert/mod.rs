//! `beam autoconvert`: a service beside a registry that converts every image pushed to it, so
//! that nobody adds `beam convert` to their pipelines (issue 17).
//!
//! - [`events`]: the push events of Distribution and Harbor, told apart by their content;
//! - [`rules`]: which tags are converted (include/exclude), and which never are (referrer and
//!   signature tags, Beam's own output);
//! - [`queue`]: the durable queue (redb): an event is acknowledged only once its job is
//!   committed, and a job leaves the queue only with its result;
//! - [`service`]: the HTTP endpoint (`POST /events`, `GET /status`, `GET /metrics`), the
//!   workers and the catch-up scan.
//!
//! A job converts what its tag names when it runs, with [`convert_image`] and the bound
//! conversion of `beam convert` (the same code, the same trust rules). Converting is
//! idempotent: the artifact, its blobs and the bound manifest are content-addressed and
//! deterministic, and a tag that already names a bound image is recognised as done. So two
//! replicas that get the same event, or a job run again after a `kill -9`, push the same bytes
//! again at worst and never a second artifact; each checks the tag just before converting,
//! which keeps that duplicate work to conversions that overlap in time.

pub mod events;
pub mod queue;
pub mod rules;
pub mod service;

use crate::convert::image::{convert_image, Binding, TagMoved};
use crate::convert::ConvertOptions;
use crate::oci::{self, ImageManifest};
use crate::registry::{self, Failure, Registry, RegistryOptions};
use crate::store::Store;
use queue::{Job, Outcome, State};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything the service needs, from flags and the config file.
#[derive(Clone)]
pub struct Settings {
    /// The registry served: `host[:port]`. Events name repositories within it.
    pub registry: String,
    pub registry_options: RegistryOptions,
    /// The bearer token every `POST /events` (and `GET /status`) must carry; None: no check.
    pub token: Option<String>,
    /// Where the queue lives (`queue.redb`).
    pub state_dir: PathBuf,
    pub rules: rules::Rules,
    /// Repositories the catch-up scan walks; empty: the registry's catalog.
    pub repositories: Vec<String>,
    /// Between two catch-up scans (the first runs at start); zero: only the one at start.
    pub scan_interval: Duration,
    /// Conversions at once.
    pub workers: usize,
    /// Attempts of a job whose registry errors are worth retrying, before it is recorded as
    /// failed.
    pub max_attempts: u32,
    pub convert: ConvertOptions,
}

/// The config file of `beam autoconvert` (`--config FILE`, TOML). Flags given on the command
/// line win over it.
///
/// ```toml
/// registry = "registry.example.com:5000"   # the registry whose pushes are converted
/// plain_http = false
/// workers = 2                               # conversions at once
/// scan_interval_secs = 600                  # catch-up scan period (0: only at start)
/// repositories = []                         # scan these (empty: the registry's catalog)
/// include = ["apps/*", "base:v*"]           # REPO[:TAG] globs; empty: every tag
/// exclude = ["*:*-debug"]
/// max_attempts = 6                          # tries on registry errors before "failed"
/// ```
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub registry: Option<String>,
    pub plain_http: Option<bool>,
    pub token_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub scan_interval_secs: Option<u64>,
    #[serde(default)]
    pub repositories: Vec<String>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub max_attempts: Option<u32>,
    pub chunk_size: Option<u32>,
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What the converter needs per job: one registry client for the whole service.
pub struct Converter {
    pub settings: Settings,
    registry: Arc<Registry>,
}

/// The result of one attempt.
pub enum Attempt {
    Done(Outcome),
    /// Recorded, and the tag queued again: it moved during the conversion.
    Again(Outcome),
    /// A registry error worth another try.
    Retry(String),
}

impl Converter {
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let registry = Arc::new(Registry::new(&settings.registry_options)?);
        Ok(Converter { settings, registry })
    }

    /// The store of `repository:tag` in the served registry.
    pub fn store(&self, repository: &str, tag: &str) -> anyhow::Result<Store> {
        let reference =
            registry::parse_reference(&format!("{}/{repository}:{tag}", self.settings.registry))?;
        Ok(Store::with_registry(
            reference,
            self.registry.clone(),
            &self.settings.registry_options,
        ))
    }

    /// The registry client.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Convert the image `job`'s tag names now.
    pub async fn run(&self, job: &Job) -> Attempt {
        let started = Instant::now();
        let record = |state: State, source: Option<String>, bound, detail: String, bytes| Outcome {
            repository: job.repository.clone(),
            tag: job.tag.clone(),
            state,
            source,
            bound,
            detail,
            finished_ms: queue::now_ms(),
            seconds: started.elapsed().as_secs_f64(),
            bytes,
            attempts: job.attempts + 1,
        };
        let outcome = |state, source, bound, detail, bytes| {
            Attempt::Done(record(state, source, bound, detail, bytes))
        };
        if let Some(why) = self.settings.rules.refuses(&job.repository, &job.tag) {
            return outcome(State::Skipped, job.digest.clone(), None, why, 0);
        }
        match self.convert(job).await {
            Ok(Converted::Skipped { digest, why }) => {
                outcome(State::Skipped, Some(digest), None, why, 0)
            }
            Ok(Converted::Done {
                source,
                bound,
                already,
                bytes,
            }) => {
                if already {
                    outcome(
                        State::AlreadyConverted,
                        Some(source),
                        bound,
                        "the tag already names a bound Beam image".into(),
                        0,
                    )
                } else {
                    outcome(
                        State::Converted,
                        Some(source),
                        bound,
                        "converted and bound; the tag names the bound image".into(),
                        bytes,
                    )
                }
            }
            Err(e) if e.downcast_ref::<TagMoved>().is_some() => {
                let moved = e.downcast_ref::<TagMoved>().expect("checked");
                Attempt::Again(record(
                    State::Skipped,
                    Some(moved.was.clone()),
                    None,
                    format!(
                        "superseded: the tag moved to {} during the conversion; that push is converted next",
                        moved.now
                    ),
                    0,
                ))
            }
            Err(e) => {
                let text = format!("{e:#}");
                let failure = Failure::of(&e);
                if failure.is_retryable() && job.attempts + 1 < self.settings.max_attempts {
                    Attempt::Retry(text)
                } else {
                    outcome(State::Failed, job.digest.clone(), None, text, 0)
                }
            }
        }
    }

    async fn convert(&self, job: &Job) -> anyhow::Result<Converted> {
        let store = self.store(&job.repository, &job.tag)?;
        let (top, bytes) = resolve_soon(&store, job.digest.is_some()).await?;
        if let Some(why) = not_an_image(&top.media_type, &bytes) {
            return Ok(Converted::Skipped {
                digest: top.digest,
                why,
            });
        }
        let results = convert_image(
            &store,
            &store,
            true,
            &self.settings.convert,
            Binding::Bound,
            false,
        )
        .await?;
        let already = results.iter().all(|r| r.already);
        let bytes = results
            .iter()
            .flat_map(|r| r.stats.iter().map(|s| s.tar_bytes))
            .sum();
        // The bound digest the tag names now: the bound manifest, or for an index the new
        // index (resolved again, it is what users pull).
        let bound = if results.len() == 1 && results[0].subject.digest == top.digest {
            results[0].bound.as_ref().map(|b| b.digest.clone())
        } else {
            store.resolve_top().await.ok().map(|(d, _)| d.digest)
        };
        let source = if already {
            results
                .first()
                .map(|r| r.subject.digest.clone())
                .unwrap_or(top.digest)
        } else {
            top.digest
        };
        Ok(Converted::Done {
            source,
            bound,
            already,
            bytes,
        })
    }
}

enum Converted {
    Done {
        source: String,
        bound: Option<String>,
        already: bool,
        bytes: u64,
    },
    Skipped {
        digest: String,
        why: String,
    },
}

/// What the tag names. Distribution sends a push's event when the manifest is stored and
/// links the tag just after, so a job from an event may find no tag for a moment: then ask
/// again, for up to 5 s.
async fn resolve_soon(
    store: &Store,
    from_event: bool,
) -> anyhow::Result<(oci::Descriptor, Vec<u8>)> {
    let mut tries = if from_event { 25 } else { 1 };
    loop {
        match store.resolve_top().await {
            Err(e) if tries > 1 && Failure::of(&e) == Failure::NotFound => {
                tries -= 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// Why a manifest the tag names is not an image to convert: Beam's own artifact, another
/// tool's referrer (a signature, an SBOM), or an artifact that is not a container image.
/// Indexes are images (their platform manifests are checked by the conversion).
pub fn not_an_image(media_type: &str, bytes: &[u8]) -> Option<String> {
    let mt = registry::media_type_of(bytes).unwrap_or_else(|_| media_type.to_string());
    if mt == oci::MEDIA_TYPE_OCI_INDEX || mt == oci::MEDIA_TYPE_DOCKER_LIST {
        return None;
    }
    let m: ImageManifest = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => return Some(format!("not an image manifest: {e}")),
    };
    if m.artifact_type.as_deref() == Some(oci::ARTIFACT_TYPE) {
        return Some("a Beam artifact (our own output)".into());
    }
    if let Some(s) = &m.subject {
        return Some(format!(
            "a referrer of {} (a signature, SBOM or other artifact), not an image",
            s.digest
        ));
    }
    if let Some(t) = &m.artifact_type {
        return Some(format!("an artifact of type {t}, not an image"));
    }
    const IMAGE_CONFIGS: &[&str] = &[
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    ];
    if !IMAGE_CONFIGS.contains(&m.config.media_type.as_str()) {
        return Some(format!(
            "config media type {} is not an image config",
            m.config.media_type
        ));
    }
    None
}

/// How long a job waits before attempt `attempts + 1`: 2 s doubling, at most 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs((2u64 << attempts.min(8)).min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_output_and_other_artifacts_are_not_images() {
        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:a","size":2},
            "layers":[]}"#;
        assert_eq!(not_an_image(oci::MEDIA_TYPE_OCI_MANIFEST, image), None);
        let beam = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "artifactType":"application/vnd.beam.image.v1",
            "config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:a","size":2},
            "layers":[],"subject":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:b","size":3}}"#;
        assert!(not_an_image(oci::MEDIA_TYPE_OCI_MANIFEST, beam)
            .unwrap()
            .contains("Beam artifact"));
        let sig = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"sha256:a","size":2},
            "layers":[]}"#;
        assert!(not_an_image(oci::MEDIA_TYPE_OCI_MANIFEST, sig)
            .unwrap()
            .contains("not an image config"));
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(not_an_image(oci::MEDIA_TYPE_OCI_INDEX, index), None);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(2));
        assert_eq!(backoff(1), Duration::from_secs(4));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }
}

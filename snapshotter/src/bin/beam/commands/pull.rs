//! `beam pull`: pull an image into containerd with the remote-snapshot labels on every layer,
//! and say per layer whether it is lazy, and why not.

use super::RegistryFlags;
use anyhow::Result;
use std::path::PathBuf;

/// Flags of `beam pull`.
#[derive(clap::Args)]
pub struct Args {
    /// containerd's socket.
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// containerd namespace (`default` is ctr's; CRI uses `k8s.io`).
    #[arg(
        long,
        short = 'n',
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// The snapshotter's name in containerd's config (`[proxy_plugins.NAME]`).
    #[arg(long, default_value = "beam")]
    snapshotter: String,
    #[command(flatten)]
    registry: RegistryFlags,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Seconds containerd keeps what this pull fetched if the pull dies (the pull's lease).
    /// A pull that takes longer fails once containerd's GC removes what it had pulled.
    #[arg(long, default_value_t = beam::pull::DEFAULT_LEASE_SECS)]
    lease_secs: u64,
    /// Image: `host[:port]/repo:tag` or `...@sha256:...`.
    image: String,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        address,
        namespace,
        snapshotter,
        registry,
        json,
        lease_secs,
        image,
    } = args;

    let opts = beam::pull::PullOptions {
        address,
        namespace,
        snapshotter,
        registry: registry.options()?,
        progress: !json,
        lease_secs,
    };
    let r = beam::pull::pull(&image, &opts).await?;
    let lazy = r.count(|o| *o == beam::pull::LayerOutcome::Lazy);
    let downloaded = r.count(|o| matches!(o, beam::pull::LayerOutcome::Downloaded(..)));
    let present = r.count(|o| *o == beam::pull::LayerOutcome::Present);
    if json {
        let layers: Vec<_> = r
            .layers
            .iter()
            .map(|(digest, chain, o)| {
                let (how, bytes, why) = match o {
                    beam::pull::LayerOutcome::Lazy => ("lazy", 0, None),
                    beam::pull::LayerOutcome::Present => ("present", 0, None),
                    beam::pull::LayerOutcome::Downloaded(n, why) => {
                        ("downloaded", *n, why.as_ref())
                    }
                };
                serde_json::json!({
                    "digest": digest, "chain_id": chain, "how": how, "bytes": bytes,
                    "fallback_reason": why.map(|w| &w.reason),
                    "fallback_fix": why.and_then(|w| w.fix.as_ref()),
                })
            })
            .collect();
        let v = serde_json::json!({
            "image": r.name,
            "target": r.target,
            "manifest": r.manifest,
            "converted": r.converted,
            "admitted": r.admitted,
            "layers": layers,
            "lazy": lazy,
            "downloaded": downloaded,
            "present": present,
            "downloaded_bytes": r.downloaded_bytes(),
            "seconds": r.seconds,
            "steps": r.steps.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} layers, {lazy} lazy, {downloaded} downloaded ({:.1} MB), {present} \
                     already present, {:.2}s",
            r.name,
            r.layers.len(),
            r.downloaded_bytes() as f64 / 1e6,
            r.seconds
        );
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}s"))
            .collect();
        println!("steps: {}", steps.join(", "));
    }
    if r.converted && downloaded > 0 {
        let mut fixes: Vec<&str> = r
            .layers
            .iter()
            .filter_map(|(_, _, o)| match o {
                beam::pull::LayerOutcome::Downloaded(_, Some(w)) => w.fix.as_deref(),
                _ => None,
            })
            .collect();
        fixes.dedup();
        if fixes.is_empty() {
            eprintln!(
                "beam: {} has a Beam conversion, yet {downloaded} layer(s) were \
                         downloaded in full (reasons above; `beam doctor` checks the setup)",
                r.name
            );
        } else {
            eprintln!(
                "beam: {} has a Beam conversion, yet {downloaded} layer(s) were \
                         downloaded in full. Fix: {}",
                r.name,
                fixes.join("; ")
            );
        }
    } else if !r.converted && downloaded > 0 {
        eprintln!(
            "beam: {} has no Beam conversion (run `beam convert {}`): its layers were \
                     downloaded in full",
            r.name, r.name
        );
    }
    Ok(())
}

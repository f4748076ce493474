//! `beam status`: what a running beam-snapshotter is doing (lazy layers, fetch progress,
//! cache use, counters), as text or JSON.

use anyhow::Result;
use std::path::PathBuf;

/// Flags of `beam status`.
#[derive(clap::Args)]
pub struct Args {
    /// The daemon's socket.
    #[arg(long, default_value = "/run/beam/beam.sock")]
    address: PathBuf,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let Args { address, json } = args;

    let s = beam::daemon::control::fetch_status(&address).await?;
    if json {
        let layers: Vec<_> = s
            .layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "snapshot": l.snapshot, "image": l.image, "layer": l.layer,
                    "mountpoint": l.mountpoint, "chunks_total": l.chunks_total,
                    "chunks_cached": l.chunks_cached, "reads": l.reads,
                    "read_errors": l.read_errors, "held": l.held,
                    "passthrough_opens": l.passthrough_opens,
                    "admitted": l.admitted,
                    "taken_over_unix_ms": (l.taken_over_unix_ms > 0)
                        .then_some(l.taken_over_unix_ms),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "version": s.version, "layers": layers,
                "cache_bytes": s.cache_bytes, "cache_budget_bytes": s.cache_budget_bytes,
                "fetch_requests": s.fetch_requests, "fetch_bytes": s.fetch_bytes,
                "fetch_failures": s.fetch_failures, "lazy_mounts": s.lazy_mounts,
                "fallbacks": s.fallbacks,
                "unlabelled_layer_prepares": s.unlabelled_layer_prepares,
                "last_fallback": s.last_fallback,
                "last_fallback_fix": s.last_fallback_fix,
                "takeover": s.takeover,
                "takeover_grace_secs": s.takeover_grace_secs,
            })
        );
    } else {
        println!("beam-snapshotter {}", s.version);
        println!(
            "lazy mounts {} (fallbacks {}); fetched {:.1} MB in {} requests ({} failed)",
            s.lazy_mounts,
            s.fallbacks,
            s.fetch_bytes as f64 / 1e6,
            s.fetch_requests,
            s.fetch_failures
        );
        if !s.last_fallback.is_empty() {
            println!("last fallback: {}", s.last_fallback);
            if !s.last_fallback_fix.is_empty() {
                println!("  fix: {}", s.last_fallback_fix);
            }
        }
        if s.unlabelled_layer_prepares > 0 {
            println!(
                "{} layer(s) came without the remote-snapshot labels and were pulled in \
                         full: run `beam doctor`",
                s.unlabelled_layer_prepares
            );
        }
        println!(
            "cache {:.1} MB (budget {})",
            s.cache_bytes as f64 / 1e6,
            if s.cache_budget_bytes == 0 {
                "unlimited".to_string()
            } else {
                format!("{:.1} MB", s.cache_budget_bytes as f64 / 1e6)
            }
        );
        if s.takeover {
            let grace = if s.takeover_grace_secs > 0.0 {
                format!(
                    "a stopped daemon's layers are kept {:.0} s for a successor, then \
                             let go (readers get errors)",
                    s.takeover_grace_secs
                )
            } else {
                "a stopped daemon's layers are kept until a successor comes".to_string()
            };
            println!("takeover on: lazy layers survive a daemon restart; {grace}");
        } else {
            println!("takeover off: a daemon restart breaks containers reading lazy layers");
        }
        for l in &s.layers {
            let connection = if l.taken_over_unix_ms > 0 {
                let at =
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(l.taken_over_unix_ms);
                let at: chrono::DateTime<chrono::Utc> = at.into();
                format!(
                    "taken over from the previous daemon at {}",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                )
            } else if l.held {
                "mounted by this daemon, held for takeover".to_string()
            } else {
                "mounted by this daemon".to_string()
            };
            println!(
                        "layer {} ({})\n  snapshot {}\n  admitted: {}\n  connection {connection}\n  fetched {}/{} chunks, {} reads, {} errors, at {}",
                        l.layer,
                        l.image,
                        l.snapshot,
                        if l.admitted.is_empty() { "(before this version)" } else { &l.admitted },
                        l.chunks_cached,
                        l.chunks_total,
                        l.reads,
                        l.read_errors,
                        if l.mountpoint.is_empty() { "(not mounted)" } else { &l.mountpoint }
                    );
        }
    }
    Ok(())
}

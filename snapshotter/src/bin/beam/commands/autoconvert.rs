//! `beam autoconvert`: the service that converts every image pushed to a registry, and
//! `beam autoconvert status`, which asks a running one what it is doing.

use super::RegistryFlags;
use anyhow::{bail, Context, Result};
use beam::autoconvert::service::{Service, Status};
use beam::autoconvert::{rules::Rules, FileConfig, Settings};
use beam::convert::ConvertOptions;
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_LISTEN: &str = "127.0.0.1:8370";
const DEFAULT_STATE: &str = "/var/lib/beam/autoconvert";

/// Flags of `beam autoconvert`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Ask a running service for its queue, what it converts now and its last results.
    Status(StatusArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the HTTP endpoint: `POST /events` (the registry's notifications),
    /// `GET /status`, `GET /metrics`, `GET /healthz`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// A file holding the bearer token every event must carry (`Authorization: Bearer
    /// TOKEN`); without it, events are not authenticated.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Where the durable queue lives (default /var/lib/beam/autoconvert).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// TOML config: registry, workers, scan interval, repositories, include/exclude rules.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The registry whose pushes are converted: `host[:port]` (or `registry` in the config).
    #[arg(long, value_name = "HOST[:PORT]")]
    registry: Option<String>,
    /// Conversions at once (default 2).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds between catch-up scans of the registry; 0 = only the scan at start
    /// (default 600).
    #[arg(long, value_name = "SECS")]
    scan_interval: Option<u64>,
    /// Scan this repository (repeatable); default: the registry's catalog.
    #[arg(long = "repository", value_name = "REPO")]
    repositories: Vec<String>,
    /// Convert only tags matching this `REPO[:TAG]` glob (repeatable).
    #[arg(long = "include", value_name = "GLOB")]
    include: Vec<String>,
    /// Never convert tags matching this `REPO[:TAG]` glob (repeatable).
    #[arg(long = "exclude", value_name = "GLOB")]
    exclude: Vec<String>,
    #[command(flatten)]
    registry_flags: RegistryFlags,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The service's address.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: String,
    /// The token file, when the service requires one.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn read_token(path: &std::path::Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token)
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Some(Sub::Status(s)) => status(s).await,
        None => serve(args.serve).await,
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let registry =
        a.registry.clone().or(file.registry.clone()).context(
            "which registry? give --registry HOST[:PORT] or `registry = ...` in --config",
        )?;
    let mut registry_options = a.registry_flags.options()?;
    if file.plain_http == Some(true) {
        registry_options.plain_http = true;
    }
    let token = match a.token_file.as_ref().or(file.token_file.as_ref()) {
        Some(p) => Some(read_token(p)?),
        None => {
            tracing::warn!("no --token-file: events are accepted without authentication");
            None
        }
    };
    let include = if a.include.is_empty() {
        file.include.clone()
    } else {
        a.include.clone()
    };
    let exclude = if a.exclude.is_empty() {
        file.exclude.clone()
    } else {
        a.exclude.clone()
    };
    let mut convert = ConvertOptions::default();
    if let Some(c) = file.chunk_size {
        convert.chunk_size = c;
    }
    // Each conversion hashes and compresses on its own threads: share the cores.
    let workers = a.workers.or(file.workers).unwrap_or(2).max(1);
    convert.workers = (convert.workers / workers).max(1);
    let settings = Settings {
        registry,
        registry_options,
        token,
        state_dir: a
            .state
            .clone()
            .or(file.state_dir.clone())
            .unwrap_or_else(|| DEFAULT_STATE.into()),
        rules: Rules::new(&include, &exclude)?,
        repositories: if a.repositories.is_empty() {
            file.repositories.clone()
        } else {
            a.repositories.clone()
        },
        scan_interval: Duration::from_secs(
            a.scan_interval.or(file.scan_interval_secs).unwrap_or(600),
        ),
        workers,
        max_attempts: file.max_attempts.unwrap_or(6).max(1),
        convert,
    };
    let listen = a.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.into());
    let registry = settings.registry.clone();
    let state = settings.state_dir.clone();
    let service = Service::open(settings)?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let depth = service.queue.depth()?;
    eprintln!(
        "beam autoconvert: converting pushes to {registry}; events at http://{}/events; \
         queue {} ({depth} queued)",
        listener.local_addr()?,
        state.join("queue.redb").display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = service.run(listener) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Jobs being converted stay queued and are converted again at the next start.
    eprintln!("beam autoconvert: stopping");
    Ok(())
}

async fn status(a: StatusArgs) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://{}/status", a.listen);
    let mut req = client.get(&url);
    if let Some(p) = &a.token_file {
        req = req.header("Authorization", format!("Bearer {}", read_token(p)?));
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("asking {url}: is beam autoconvert running there?"))?;
    let code = resp.status();
    let body = resp.text().await?;
    if !code.is_success() {
        bail!("{url} answered {code}: {}", body.trim());
    }
    if a.json {
        println!("{body}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&body).with_context(|| format!("parsing {url}"))?;
    println!(
        "beam autoconvert for {}: {} queued, {} converting",
        s.registry,
        s.queue_depth,
        s.converting.len()
    );
    for c in &s.converting {
        println!("  converting {c}");
    }
    for j in &s.queued {
        let retry = if j.attempts > 0 {
            format!(" (attempt {} failed: {})", j.attempts, j.last_error)
        } else {
            String::new()
        };
        println!("  queued {}:{}{retry}", j.repository, j.tag);
    }
    if !s.last_scan_error.is_empty() {
        println!("last catch-up scan failed: {}", s.last_scan_error);
    }
    println!(
        "{}",
        s.counters
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !s.results.is_empty() {
        println!("last results:");
    }
    for r in &s.results {
        let state = serde_json::to_value(r.state)?
            .as_str()
            .unwrap_or_default()
            .to_string();
        println!(
            "  {state:<17} {}:{} {}{} ({:.1}s) {}",
            r.repository,
            r.tag,
            r.source.as_deref().unwrap_or("-"),
            r.bound
                .as_deref()
                .map(|b| format!(" -> {b}"))
                .unwrap_or_default(),
            r.seconds,
            r.detail
        );
    }
    Ok(())
}

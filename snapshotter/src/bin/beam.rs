//! `beam`: the command line. Thin: parses flags, sets up logging, calls the library.

use anyhow::{bail, Context, Result};
use beam::convert::image::convert_image;
use beam::convert::ConvertOptions;
use beam::remote::RemoteOptions;
use beam::store::{Location, Store};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "beam",
    version,
    about = "Beam: start containers before their image is downloaded"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Registry access flags shared by every command that talks to a registry.
#[derive(Args, Clone)]
struct RegistryFlags {
    /// Use plain HTTP (no TLS) for every registry.
    #[arg(long)]
    plain_http: bool,
    /// Use plain HTTP for this host (repeatable); also `BEAM_PLAIN_HTTP_HOSTS=h1,h2`.
    #[arg(long = "plain-http-host", value_name = "HOST[:PORT]")]
    plain_http_hosts: Vec<String>,
    /// Trust this PEM CA certificate for HTTPS registries (repeatable).
    #[arg(long = "ca-file", value_name = "FILE")]
    ca_files: Vec<PathBuf>,
}

impl RegistryFlags {
    fn options(&self) -> RemoteOptions {
        RemoteOptions {
            plain_http: self.plain_http,
            plain_http_hosts: self.plain_http_hosts.clone(),
            ca_files: self.ca_files.clone(),
        }
        .with_env()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image's layers into Beam layers and publish the Beam artifact beside it.
    Convert {
        #[command(flatten)]
        registry: RegistryFlags,
        /// Chunk size in bytes (4 KiB to 16 MiB).
        #[arg(long, default_value_t = beam::format::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// Worker threads for hashing and compression (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Source image: `host[:port]/repo:tag` or `oci:DIR[:TAG]`.
        src: String,
        /// Destination (default: the source). The original image is copied there unchanged.
        dst: Option<String>,
    },
    /// Write a converted image's root filesystem into DIR from its Beam layers.
    Unpack {
        #[command(flatten)]
        registry: RegistryFlags,
        /// Image: `host[:port]/repo:tag` or `oci:DIR[:TAG]`.
        image: String,
        /// Directory to create (must be empty).
        dir: PathBuf,
    },
    /// Show an image's Beam conversion: artifact, layers, chunk counts.
    Inspect {
        #[command(flatten)]
        registry: RegistryFlags,
        image: String,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beam: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beam: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            registry,
            chunk_size,
            jobs,
            json,
            src,
            dst,
        } => {
            let opts = registry.options();
            let src_loc = Location::parse(&src)?;
            let same_place = dst.is_none();
            let dst_loc = match &dst {
                Some(d) => Location::parse(d)?,
                None => src_loc.clone(),
            };
            let src_store = Store::open(src_loc, &opts, false)?;
            let dst_store = Store::open(dst_loc, &opts, true)?;
            let mut copts = ConvertOptions {
                chunk_size,
                ..ConvertOptions::default()
            };
            if let Some(j) = jobs {
                copts.workers = j.max(1);
            }
            let progress = std::io::stderr().is_terminal() && !json;
            let started = std::time::Instant::now();
            let results =
                convert_image(&src_store, &dst_store, same_place, &copts, progress).await?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                let v: Vec<_> = results
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "subject": r.subject.digest,
                            "artifact": r.artifact.digest,
                            "already_converted": r.already,
                            "layers": r.layers.iter().zip(&r.stats).map(|(l, s)| serde_json::json!({
                                "source": l.source,
                                "diff_id": l.diff_id,
                                "index": l.index.digest,
                                "index_size": l.index.size,
                                "chunks": l.chunks.digest,
                                "chunks_size": l.chunks.size,
                                "files": s.files,
                                "file_bytes": s.file_bytes,
                                "tar_bytes": s.tar_bytes,
                                "chunks_total": s.chunks_total,
                                "chunks_unique": s.chunks_unique,
                            })).collect::<Vec<_>>(),
                            "seconds": secs,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in &results {
                    let tar: u64 = r.stats.iter().map(|s| s.tar_bytes).sum();
                    let beam: u64 = r.layers.iter().map(|l| l.index.size + l.chunks.size).sum();
                    println!(
                        "{} {} -> Beam artifact {} ({} layers, {:.1} MB of tar -> {:.1} MB, {:.1}s){}",
                        dst_store.location,
                        r.subject.digest,
                        r.artifact.digest,
                        r.layers.len(),
                        tar as f64 / 1e6,
                        beam as f64 / 1e6,
                        secs,
                        if r.already { " (already converted)" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Unpack {
            registry,
            image,
            dir,
        } => {
            let store = Store::open(Location::parse(&image)?, &registry.options(), false)?;
            let s = beam::unpack::unpack_image(&store, &dir).await?;
            eprintln!(
                "unpacked {} layers, {} entries, {:.1} MB into {}",
                s.layers,
                s.entries,
                s.bytes as f64 / 1e6,
                dir.display()
            );
            Ok(())
        }
        Command::Inspect { registry, image } => {
            let store = Store::open(Location::parse(&image)?, &registry.options(), false)?;
            let m = store.platform_manifest().await?;
            let Some((artifact, layers)) = store.find_beam(&m.desc.digest).await? else {
                bail!("{image} ({}) has no Beam conversion", m.desc.digest);
            };
            println!("image    {}", m.desc.digest);
            println!("artifact {artifact}");
            for l in layers {
                let idx = store
                    .blob_bytes(&l.index, beam::format::index::MAX_INDEX_LEN as u64)
                    .await?;
                let r = beam::format::IndexReader::new(idx)
                    .with_context(|| format!("index of layer {}", l.source))?;
                println!(
                    "layer {}\n  index {} ({} bytes, {} inodes, chunk size {})\n  chunks {} ({} bytes, {} unique chunks)",
                    l.source,
                    l.index.digest,
                    l.index.size,
                    r.inode_count(),
                    r.chunk_size(),
                    l.chunks.digest,
                    l.chunks.size,
                    r.chunk_count()
                );
            }
            Ok(())
        }
    }
}

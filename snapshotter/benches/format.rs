//! Beam format benchmark (run through `bench/format.sh`, which prepares the inputs).
//!
//! On a set of layer tars (`BEAM_BENCH_LAYERS/layers.txt`) it measures, each against a
//! baseline run side by side in the same process and quoted as a ratio (medians of
//! `BEAM_BENCH_RUNS`, default 5):
//! - conversion throughput per core and on all cores, against gzip -6 compression of the same
//!   tars (what building an ordinary layer costs);
//! - lz4 decompression throughput per core of every stored chunk, against gzip and zstd
//!   decompression of the same bytes;
//! - the Beam layer size (index + chunk blob) against the gzip and zstd layer sizes;
//! - a chunk-size sweep (64 KiB to 4 MiB): size, chunk count, and the bytes a lazy mount would
//!   fetch for the workload whose files are listed in `BEAM_BENCH_READS`.
//!
//! It lives in `beam`, not beside the format in `beam-format`, because it times conversion
//! (`beam::convert`, tar parsing and the worker pool) as much as the format itself.

use beam::convert::{convert_layer, ConvertOptions};
use beam::format::chunk;
use beam::format::IndexReader;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed().as_secs_f64(), r)
}

struct Converted {
    index: Vec<u8>,
    blob: Vec<u8>,
}

fn convert(tar: &[u8], chunk_size: u32, workers: usize) -> Converted {
    let mut blob = Vec::new();
    let opts = ConvertOptions {
        chunk_size,
        workers,
        ..ConvertOptions::default()
    };
    let c = convert_layer(tar, &mut blob, &opts, None).expect("conversion");
    Converted {
        index: c.index,
        blob,
    }
}

fn main() {
    let Some(dir) = std::env::var_os("BEAM_BENCH_LAYERS").map(PathBuf::from) else {
        eprintln!("format bench: set BEAM_BENCH_LAYERS (bench/format.sh does); skipping");
        return;
    };
    let runs: usize = std::env::var("BEAM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let list = std::fs::read_to_string(dir.join("layers.txt")).expect("layers.txt");
    let tars: Vec<Vec<u8>> = list
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| std::fs::read(dir.join(l.trim())).expect("layer tar"))
        .collect();
    let total: usize = tars.iter().map(Vec::len).sum();
    let mb = total as f64 / 1e6;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "input: {} layers, {mb:.1} MB of tar, {cores} cores, {runs} runs, medians",
        tars.len()
    );

    // Conversion vs gzip -6, per core and on all cores.
    let cs = beam::format::DEFAULT_CHUNK_SIZE;
    let mut conv1 = Vec::new();
    let mut convn = Vec::new();
    let mut gz = Vec::new();
    let mut gz_size = 0usize;
    for _ in 0..runs {
        conv1.push(time(|| tars.iter().for_each(|t| drop(convert(t, cs, 1)))).0);
        convn.push(time(|| tars.iter().for_each(|t| drop(convert(t, cs, cores)))).0);
        let (t, size) = time(|| {
            tars.iter()
                .map(|t| {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                    e.write_all(t).expect("gzip");
                    e.finish().expect("gzip").len()
                })
                .sum::<usize>()
        });
        gz.push(t);
        gz_size = size;
    }
    let (c1, cn, g) = (median(conv1), median(convn), median(gz));
    println!(
        "convert, 1 worker:       {:8.1} MB/s   (gzip -6 of the same tars: {:.1} MB/s; ratio {:.2}x)",
        mb / c1,
        mb / g,
        g / c1
    );
    println!(
        "convert, {cores} workers:      {:8.1} MB/s   ({:.2}x the 1-worker rate)",
        mb / cn,
        c1 / cn
    );

    // Decompression of every stored chunk (lz4) vs gzip and zstd of the same uncompressed
    // bytes, per core.
    let converted: Vec<Converted> = tars.iter().map(|t| convert(t, cs, cores)).collect();
    let beam_size: usize = converted.iter().map(|c| c.index.len() + c.blob.len()).sum();
    let mut stored: Vec<(Vec<u8>, usize, chunk::ChunkDigest)> = Vec::new();
    for c in &converted {
        let idx = IndexReader::new(&c.index[..]).expect("index");
        for i in 0..idx.chunk_count() {
            let r = idx.chunk(i).expect("chunk");
            let s = &c.blob[r.offset as usize..r.offset as usize + r.stored_len as usize];
            stored.push((s.to_vec(), r.uncompressed_len as usize, r.digest));
        }
    }
    let plain: usize = stored.iter().map(|s| s.1).sum();
    let gz_chunks: Vec<Vec<u8>> = tars
        .iter()
        .map(|t| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(t).expect("gzip");
            e.finish().expect("gzip")
        })
        .collect();
    let zstd_layers: Vec<Vec<u8>> = tars
        .iter()
        .map(|t| zstd::encode_all(&t[..], 3).expect("zstd"))
        .collect();
    let zstd_size: usize = zstd_layers.iter().map(Vec::len).sum();
    let mut lz = Vec::new();
    let mut lz_verified = Vec::new();
    let mut gzd = Vec::new();
    let mut zsd = Vec::new();
    let mut out = vec![0u8; cs as usize];
    for _ in 0..runs {
        lz.push(
            time(|| {
                for (s, n, _) in &stored {
                    if s.len() < *n {
                        lz4_flex::block::decompress_into(s, &mut out[..*n]).expect("lz4");
                    }
                }
            })
            .0,
        );
        lz_verified.push(
            time(|| {
                for (s, n, d) in &stored {
                    chunk::decode(s, *n, d).expect("verified chunk");
                }
            })
            .0,
        );
        gzd.push(
            time(|| {
                for g in &gz_chunks {
                    std::io::copy(
                        &mut flate2::read::GzDecoder::new(&g[..]),
                        &mut std::io::sink(),
                    )
                    .expect("gunzip");
                }
            })
            .0,
        );
        zsd.push(
            time(|| {
                for z in &zstd_layers {
                    std::io::copy(
                        &mut zstd::stream::read::Decoder::new(&z[..]).expect("zstd"),
                        &mut std::io::sink(),
                    )
                    .expect("unzstd");
                }
            })
            .0,
        );
    }
    let compressed: usize = stored.iter().filter(|s| s.0.len() < s.1).map(|s| s.1).sum();
    let (lz, lzv, gzd, zsd) = (median(lz), median(lz_verified), median(gzd), median(zsd));
    println!(
        "lz4 decompress, 1 core:  {:8.1} MB/s   of uncompressed output ({:.0}% of chunks' bytes were compressed)",
        compressed as f64 / 1e6 / lz,
        100.0 * compressed as f64 / plain as f64
    );
    println!(
        "  with sha256 verify:    {:8.1} MB/s",
        plain as f64 / 1e6 / lzv
    );
    let lz_rate = compressed as f64 / 1e6 / lz;
    println!(
        "  baselines, 1 core:     gzip {:.1} MB/s (lz4 is {:.1}x faster), zstd -3 {:.1} MB/s (lz4 is {:.1}x faster)",
        mb / gzd,
        lz_rate / (mb / gzd),
        mb / zsd,
        lz_rate / (mb / zsd)
    );
    println!(
        "size: beam {:.1} MB (index {:.2} MB), gzip -6 {:.1} MB, zstd -3 {:.1} MB, tar {mb:.1} MB; beam/gzip = {:.2}",
        beam_size as f64 / 1e6,
        converted.iter().map(|c| c.index.len()).sum::<usize>() as f64 / 1e6,
        gz_size as f64 / 1e6,
        zstd_size as f64 / 1e6,
        beam_size as f64 / gz_size as f64
    );

    // Chunk-size sweep with the workload's read set.
    let reads: BTreeSet<Vec<u8>> = std::env::var_os("BEAM_BENCH_READS")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.lines().map(|l| l.trim().as_bytes().to_vec()).collect())
        .unwrap_or_default();
    println!(
        "chunk-size sweep (workload: {} files read; fetched = index + unique chunks holding them):",
        reads.len()
    );
    println!("  chunk     beam size   chunks   fetched     read-set bytes");
    for cs in [64u32, 128, 256, 512, 1024, 2048, 4096].map(|k| k * 1024) {
        let convs: Vec<Converted> = tars.iter().map(|t| convert(t, cs, cores)).collect();
        let size: usize = convs.iter().map(|c| c.index.len() + c.blob.len()).sum();
        let mut chunks = 0u64;
        let mut fetched = 0u64;
        let mut read_bytes = 0u64;
        let mut found: BTreeSet<Vec<u8>> = BTreeSet::new();
        // Topmost layer wins.
        for c in convs.iter().rev() {
            let idx = IndexReader::new(&c.index[..]).expect("index");
            chunks += idx.chunk_count();
            fetched += c.index.len() as u64;
            let mut seen = BTreeSet::new();
            for p in &reads {
                if found.contains(p) {
                    continue;
                }
                let Some(ino) = idx.lookup_path(p).expect("lookup") else {
                    continue;
                };
                let rec = idx.inode(ino).expect("inode");
                if rec.kind != beam::format::InodeKind::File {
                    continue;
                }
                found.insert(p.clone());
                read_bytes += rec.size;
                for ch in idx.file_chunks(&rec) {
                    if seen.insert(ch) {
                        fetched += idx.chunk(ch).expect("chunk").stored_len as u64;
                    }
                }
            }
        }
        println!(
            "  {:>5} KiB {:>8.1} MB {:>8} {:>8.2} MB {:>8.2} MB",
            cs / 1024,
            size as f64 / 1e6,
            chunks,
            fetched as f64 / 1e6,
            read_bytes as f64 / 1e6
        );
    }
}

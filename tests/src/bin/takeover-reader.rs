//! The workload of the takeover tests (issue 7): a program that reads files of a lazy image in a
//! tight loop, as a container would, and reports what it saw. It runs inside a container (its
//! image carries it and the shared libraries it needs) or as a plain process beside the test.
//!
//! `takeover-reader ROOT OUTDIR`: every round opens, reads whole and closes `ROOT/data/small.txt`
//! (an OPEN, READs and a FLUSH the daemon must answer), and preads 64 KiB of
//! `ROOT/data/big.bin` through a descriptor kept open since the start; each is checked against
//! the content it must have (a pattern both sides compute). From round 100 on it also keeps a
//! second descriptor of small.txt open and preads it (opened once the file is cached: a FUSE
//! passthrough open, whose backing file every later open must share). When `OUTDIR/cold` appears holding a
//! number N, the reader also preads 4 KiB at offset N * 512 KiB of `ROOT/data/cold.bin`, which no
//! earlier round touched (so it reaches the registry), and reports N done.
//!
//! Every 100 ms it replaces `OUTDIR/stats.json` (write + rename): when it was written, rounds,
//! errors and the first
//! error, the cold reads done, and every round that took over 2 ms as (end time in Unix
//! nanoseconds, duration in nanoseconds), which is how the test measures the stall of each
//! restart. It stops when `OUTDIR/stop` appears.
//!
//! A separate process on purpose: a process with a descriptor open on a FUSE file must not
//! spawn the daemon's successor (the child's exec closes that descriptor, which sends a FLUSH
//! nobody answers until the successor runs: a deadlock).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The small file's content.
fn small() -> Vec<u8> {
    b"read me through a restart\n".repeat(400)
}

/// Byte `i` of the big file.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Byte `i` of the cold file: pseudo-random (splitmix64 of `i / 8`), so no cold chunk equals
/// any other chunk (chunks are stored by digest, once) and the file does not compress (its
/// layer stays too big to be fetched whole at mount: the cold file stays cold).
fn cold_pattern(i: u64) -> u8 {
    let mut z = (i >> 3).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> ((i & 7) * 8)) as u8
}

const SLOW_ROUND: Duration = Duration::from_millis(2);
const COLD_STRIDE: u64 = 512 << 10;
const COLD_READ: usize = 4096;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[derive(Default)]
struct Stats {
    rounds: u64,
    errors: u64,
    first_error: Option<String>,
    cold_done: Vec<u64>,
    slow: Vec<(u128, u128)>,
}

impl Stats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    fn json(&self) -> String {
        let slow: Vec<String> = self
            .slow
            .iter()
            .map(|(end, d)| format!("[{end},{d}]"))
            .collect();
        let cold: Vec<String> = self.cold_done.iter().map(|n| n.to_string()).collect();
        let first = match &self.first_error {
            Some(e) => format!("\"{}\"", e.replace(['"', '\\'], "'")),
            None => "null".to_string(),
        };
        format!(
            "{{\"written\":{},\"rounds\":{},\"errors\":{},\"first_error\":{},\"cold_done\":[{}],\"slow\":[{}]}}\n",
            now_ns(),
            self.rounds,
            self.errors,
            first,
            cold.join(","),
            slow.join(",")
        )
    }
}

fn write_stats(out: &Path, stats: &Stats) {
    let tmp = out.join("stats.json.tmp");
    let ok = File::create(&tmp)
        .and_then(|mut f| f.write_all(stats.json().as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, out.join("stats.json")));
    if let Err(e) = ok {
        eprintln!("takeover-reader: writing stats: {e}");
    }
}

fn check(got: &[u8], off: u64, what: &str, want: fn(u64) -> u8) -> Result<(), String> {
    match got
        .iter()
        .enumerate()
        .find(|(i, b)| **b != want(off + *i as u64))
    {
        None => Ok(()),
        Some((i, _)) => Err(format!("wrong byte in {what} at {}", off + i as u64)),
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [root, out] = args.as_slice() else {
        eprintln!("usage: takeover-reader ROOT OUTDIR");
        std::process::exit(2);
    };
    let small_path = root.join("data/small.txt");
    let want_small = small();
    let big = match File::open(root.join("data/big.bin")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("takeover-reader: opening big.bin: {e}");
            std::process::exit(1);
        }
    };
    let big_len = big.metadata().map(|m| m.len()).unwrap_or(0);
    let mut stats = Stats::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    let mut last_write = Instant::now();
    let cold_trigger = out.join("cold");
    let mut cold_seen = String::new();
    let mut kept_small: Option<File> = None;
    loop {
        if out.join("stop").exists() {
            break;
        }
        let t0 = Instant::now();
        match std::fs::read(&small_path) {
            Ok(b) if b == want_small => {}
            Ok(_) => stats.error("wrong content of small.txt".into()),
            Err(e) => stats.error(format!("small.txt: {e}")),
        }
        if big_len > buf.len() as u64 {
            match big.read_exact_at(&mut buf, off) {
                Ok(()) => {
                    if let Err(e) = check(&buf, off, "big.bin", pattern) {
                        stats.error(e);
                    }
                }
                Err(e) => stats.error(format!("big.bin at {off}: {e}")),
            }
            off = (off + 4096 * 7) % (big_len - buf.len() as u64);
        }
        // From round 100 on, small.txt is also kept open: cached by then, so opened with FUSE
        // passthrough, and every later open of it must share that open's backing file (also
        // after the daemon was replaced).
        if stats.rounds == 100 {
            match File::open(&small_path) {
                Ok(f) => kept_small = Some(f),
                Err(e) => stats.error(format!("keeping small.txt open: {e}")),
            }
        }
        if let Some(f) = &kept_small {
            let mut b = vec![0u8; want_small.len()];
            match f.read_exact_at(&mut b, 0) {
                Ok(()) if b == want_small => {}
                Ok(()) => stats.error("wrong content of the kept small.txt".into()),
                Err(e) => stats.error(format!("kept small.txt: {e}")),
            }
        }
        if let Ok(n) = std::fs::read_to_string(&cold_trigger) {
            let n = n.trim().to_string();
            if !n.is_empty() && n != cold_seen {
                cold_seen = n.clone();
                match n.parse::<u64>() {
                    Ok(i) => {
                        let at = i * COLD_STRIDE;
                        let mut c = vec![0u8; COLD_READ];
                        let r = File::open(root.join("data/cold.bin"))
                            .and_then(|f| f.read_exact_at(&mut c, at));
                        match r {
                            Ok(()) => match check(&c, at, "cold.bin", cold_pattern) {
                                Ok(()) => stats.cold_done.push(i),
                                Err(e) => stats.error(e),
                            },
                            Err(e) => stats.error(format!("cold.bin at {at}: {e}")),
                        }
                    }
                    Err(_) => stats.error(format!("bad cold trigger {n:?}")),
                }
            }
        }
        let took = t0.elapsed();
        stats.rounds += 1;
        if took > SLOW_ROUND {
            stats.slow.push((now_ns(), took.as_nanos()));
        }
        if last_write.elapsed() > Duration::from_millis(100) {
            write_stats(out, &stats);
            last_write = Instant::now();
        }
    }
    write_stats(out, &stats);
}

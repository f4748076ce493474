//! Writes the seed corpus: a few valid indexes made with `IndexBuilder`, each checked by the
//! same decode-and-walk the fuzz targets run.
//!
//! Usage: gen_seeds [DIR]   (default: fuzz/seeds, relative to the working directory)

use beam_format::index::{ChunkRecord, IndexBuilder, InodeKind, Node};
use beam_format::ChunkDigest;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn chunk(n: u8, offset: u64, stored_len: u32, uncompressed_len: u32) -> ChunkRecord {
    ChunkRecord {
        digest: ChunkDigest([n; 32]),
        offset,
        stored_len,
        uncompressed_len,
    }
}

fn builder(chunk_size: u32, nodes: Vec<Node>, chunks: Vec<ChunkRecord>) -> IndexBuilder {
    let blob_size = chunks
        .iter()
        .map(|c| c.offset + c.stored_len as u64)
        .max()
        .unwrap_or(0);
    IndexBuilder {
        chunk_size,
        blob_size,
        nodes,
        chunks,
        prefetch: Vec::new(),
    }
}

/// Just the root directory.
fn root_only() -> IndexBuilder {
    builder(4096, vec![Node::new(InodeKind::Dir, 0o755)], Vec::new())
}

/// Every inode kind, several xattrs, a deep directory chain, shared chunks.
fn every_kind() -> IndexBuilder {
    let mut nodes = vec![Node::new(InodeKind::Dir, 0o755)];
    let add = |nodes: &mut Vec<Node>, parent: usize, name: &[u8], node: Node| -> usize {
        nodes.push(node);
        let id = nodes.len() - 1;
        nodes[parent].children.insert(name.to_vec(), id);
        id
    };
    let mut etc = Node::new(InodeKind::Dir, 0o755);
    etc.xattrs.insert(b"user.a".to_vec(), b"1".to_vec());
    etc.xattrs.insert(b"user.b".to_vec(), Vec::new());
    etc.xattrs
        .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    let etc = add(&mut nodes, 0, b"etc", etc);
    let mut passwd = Node::new(InodeKind::File, 0o644);
    passwd.size = 3 * 4096;
    passwd.chunks = vec![0, 0, 0];
    passwd.mtime = 1_700_000_000;
    passwd.mtime_nsec = 123;
    let passwd = add(&mut nodes, etc, b"passwd", passwd);
    nodes[0].children.insert(b"passwd-link".to_vec(), passwd);
    let mut empty = Node::new(InodeKind::File, 0o600);
    empty.uid = 65534;
    empty.gid = 65534;
    add(&mut nodes, etc, b"empty", empty);
    let mut tail = Node::new(InodeKind::File, 0o755);
    tail.size = 4096 + 1;
    tail.chunks = vec![0, 1];
    add(&mut nodes, 0, b"tail", tail);
    let mut blk = Node::new(InodeKind::BlockDev, 0o660);
    blk.rdev = (8, 1);
    add(&mut nodes, 0, b"sda1", blk);
    add(&mut nodes, 0, b"fifo", Node::new(InodeKind::Fifo, 0o644));
    add(&mut nodes, etc, b"gone", Node::new(InodeKind::Whiteout, 0));
    let mut deep = 0;
    for i in 0..8u8 {
        let mut d = Node::new(InodeKind::Dir, 0o700);
        d.opaque = i % 3 == 0;
        deep = add(&mut nodes, deep, &[b'd', b'0' + i], d);
    }
    let mut abs = Node::new(InodeKind::Symlink, 0o777);
    abs.target = b"/etc/passwd".to_vec();
    add(&mut nodes, deep, b"abs", abs);
    let mut long = Node::new(InodeKind::Symlink, 0o777);
    long.target = vec![b'x'; 300];
    add(&mut nodes, deep, &[b'n'; 255], long);
    let mut b = builder(
        4096,
        nodes,
        vec![chunk(7, 0, 100, 4096), chunk(8, 100, 1, 1)],
    );
    b.prefetch = vec![passwd, 0, deep];
    b
}

/// A wide directory (binary search over many entries) and a large chunk size.
fn wide() -> IndexBuilder {
    let mut nodes = vec![Node::new(InodeKind::Dir, 0o755)];
    let mut chunks = Vec::new();
    for i in 0..40u32 {
        let mut f = Node::new(InodeKind::File, 0o644);
        f.size = 1000 + i as u64;
        f.chunks = vec![i];
        chunks.push(chunk(i as u8, i as u64 * 2000, 1000 + i, 1000 + i));
        nodes.push(f);
        let id = nodes.len() - 1;
        nodes[0]
            .children
            .insert(format!("file-{i:03}").into_bytes(), id);
    }
    let mut b = builder(1 << 20, nodes, chunks);
    b.prefetch = (1..=40).rev().collect();
    b
}

/// At the reader's limits (issue 16): directories nested exactly `DEFAULT_MAX_DEPTH` deep, a
/// 16 MiB chunk at the largest expansion lz4 can give, 255-byte names, extreme field values.
fn at_limits() -> IndexBuilder {
    use beam_format::index::DEFAULT_MAX_DEPTH;
    let mut nodes = vec![Node::new(InodeKind::Dir, 0o7777)];
    let mut parent = 0;
    for _ in 0..DEFAULT_MAX_DEPTH {
        nodes.push(Node::new(InodeKind::Dir, 0o755));
        let id = nodes.len() - 1;
        nodes[parent].children.insert(b"d".to_vec(), id);
        parent = id;
    }
    let max = beam_format::MAX_CHUNK_SIZE;
    let mut big = Node::new(InodeKind::File, 0o7777);
    big.size = max as u64;
    big.chunks = vec![0];
    big.uid = u32::MAX;
    big.gid = u32::MAX;
    big.mtime = i64::MAX;
    big.mtime_nsec = 999_999_999;
    big.xattrs.insert(vec![b'x'; 255], vec![0xff; 4096]);
    nodes.push(big);
    let id = nodes.len() - 1;
    nodes[parent].children.insert(vec![b'n'; 255], id);
    let mut dev = Node::new(InodeKind::CharDev, 0o600);
    dev.rdev = (u32::MAX, u32::MAX);
    dev.mtime = i64::MIN;
    nodes.push(dev);
    let id = nodes.len() - 1;
    nodes[0].children.insert(vec![0xfe; 255], id);
    // The fewest stored bytes the reader accepts for a full chunk (lz4's 255:1, with slack).
    let stored = (max - 1024).div_ceil(255);
    builder(max, nodes, vec![chunk(9, 0, stored, max)])
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("fuzz/seeds"));
    std::fs::create_dir_all(&dir).expect("create seed directory");
    let seeds: BTreeMap<&str, IndexBuilder> = [
        ("root-only", root_only()),
        ("sample", beam_format::index::sample()),
        ("every-kind", every_kind()),
        ("wide", wide()),
        ("at-limits", at_limits()),
    ]
    .into_iter()
    .collect();
    for (name, b) in seeds {
        let mut bytes = b.encode().expect("encode seed");
        if name == "sample" {
            // With a follows section naming this layer and another one.
            use beam_format::index::{with_follows, Follow};
            let e = |from, layer, ino| Follow { from, layer, ino };
            bytes = with_follows(&bytes, &[[7; 32]], &[e(2, 0, 4), e(4, 1, 9), e(4, 0, 2)])
                .expect("follows of the sample");
        }
        assert!(
            beam_fuzz::decode_and_walk(&bytes),
            "seed {name} is not accepted by the reader"
        );
        let path = dir.join(format!("{name}.idx"));
        std::fs::write(&path, &bytes).expect("write seed");
        println!("{} ({} bytes)", path.display(), bytes.len());
        // The same index packed, as `beam convert` stores it: the `index_unpack` corpus.
        let packed = beam_format::index::packed::pack(&bytes);
        if bytes.len() <= beam_fuzz::UNPACK_LIMIT {
            assert!(
                beam_fuzz::unpack_decode_and_walk(&packed),
                "packed seed {name} is not accepted"
            );
        }
        let path = dir.join("packed").join(format!("{name}.idz"));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create packed seeds");
        std::fs::write(&path, &packed).expect("write packed seed");
        println!("{} ({} bytes)", path.display(), packed.len());
    }
}

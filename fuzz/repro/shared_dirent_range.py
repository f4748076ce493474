#!/usr/bin/env python3
"""Write an index that IndexReader::new accepts but takes K*M steps to validate.

The root and K further directories all point at the same range of M directory entries (every
entry names a fifo whose parent is the root). Nothing in the format forbids ranges that
overlap, and validation walks each directory's range separately, so the time grows with the
product, not the size: 10000/10000 is a 1.4 MiB index.

Usage: shared_dirent_range.py M K OUT     then e.g.  time <fuzz binary> -runs=1 OUT
"""
import hashlib, struct, sys, itertools, string
M, K, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
names = [''.join(t).encode() for t in itertools.islice(itertools.product(string.ascii_lowercase, repeat=4), M)]
inodes = bytearray()
def inode(kind, parent, a=0, b=0):
    r = bytearray(64); r[0] = kind
    struct.pack_into('<I', r, 4, 0o755); struct.pack_into('<I', r, 28, 1)
    struct.pack_into('<I', r, 32, parent); struct.pack_into('<II', r, 44, a, b)
    return r
inodes += inode(2, 1, 0, M)                      # root: entries 0..M
for i in range(M): inodes += inode(6, 1)         # fifos 2..M+1
for k in range(K): inodes += inode(2, 1, 0, M)   # K orphan dirs sharing entries 0..M
strings = b''.join(names)
dirents = bytearray()
for i, n in enumerate(names):
    dirents += struct.pack('<IHHQ', 4 * i, 4, 0, i + 2)
secs = [bytes(inodes), bytes(dirents), b'', b'', b'', strings, b'']
h = bytearray(b'BEAMIDX\0' + struct.pack('<IIIIQ', 1, 192, 4096, 0, 0))
off = 192
for s in secs:
    h += struct.pack('<QQ', off, len(s)); off += len(s)
h += bytes(192 - len(h))
b = h + b''.join(secs)
b[160:192] = hashlib.sha256(b).digest()
open(out, 'wb').write(b)
print(out, len(b), 'bytes;', K * M, 'dirent checks')

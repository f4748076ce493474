//! This process's mount table (`/proc/self/mountinfo`), read without touching any mount.
//!
//! Why not stat(2): a stat of a FUSE mount is a request to its session, and a session frozen
//! for a hand-over, or a connection nobody serves yet, would not answer it. Mount points are
//! unescaped as the kernel escapes them (space, tab, newline and backslash as `\ooo`), so a
//! path with a space is found too.

use std::path::Path;

/// One line of mountinfo: what Beam asks of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount's device number, "major:minor" (a FUSE mount's is anonymous: "0:N").
    pub device: String,
    /// The mount point, unescaped.
    pub point: Vec<u8>,
    /// The filesystem type (`fuse.beam`, `overlay`, ...).
    pub fstype: String,
}

/// The mounts in the text of a mountinfo file, in its order (a later mount on the same point
/// is on top of an earlier one). Malformed lines are skipped.
pub fn parse(info: &str) -> Vec<Mount> {
    info.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let point = fields.nth(1)?;
            let fstype = line.split_once(" - ")?.1.split(' ').next()?;
            Some(Mount {
                device: device.into(),
                point: unescape(point),
                fstype: fstype.into(),
            })
        })
        .collect()
}

/// This process's mounts (none when mountinfo cannot be read).
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| parse(&info))
        .unwrap_or_default()
}

/// The topmost mount at `p`, if `p` is a mount point.
pub fn mount_at<'a>(mounts: &'a [Mount], p: &Path) -> Option<&'a Mount> {
    let want = p.as_os_str().as_encoded_bytes();
    mounts.iter().rev().find(|m| m.point == want)
}

/// Whether `p` is a mount point.
pub fn is_mountpoint(p: &Path) -> bool {
    mount_at(&mounts(), p).is_some()
}

/// A mountinfo path field as bytes.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_unescaped_and_the_top_one_wins() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
97 22 0:52 / /var/lib/beam/work/layer\\0401 ro,nosuid - fuse.beam beam:sha256:ab ro
98 22 0:53 / /mnt/x rw - tmpfs tmpfs rw
99 98 0:54 / /mnt/x ro shared:7 - fuse.beam beam:sha256:cd ro
garbage
";
        let mounts = parse(info);
        assert_eq!(mounts.len(), 4);
        let at = |p: &str| mount_at(&mounts, Path::new(p)).cloned();
        let layer = at("/var/lib/beam/work/layer 1").unwrap();
        assert_eq!(
            (layer.device.as_str(), layer.fstype.as_str()),
            ("0:52", "fuse.beam")
        );
        // Stacked mounts: the one on top.
        assert_eq!(at("/mnt/x").unwrap().device, "0:54");
        assert_eq!(at("/mnt"), None);
        assert_eq!(at("/var/lib/beam/work/layer\\0401"), None);
        assert_eq!(at("/").unwrap().fstype, "ext4");
    }
}

//! Every snapshot label Beam reads or writes, in one place for both sides of the protocol:
//! `beam pull` (which writes the remote-snapshot labels and reads the fallback labels) and
//! beam-snapshotter (which reads the former and writes the latter).
//!
//! containerd forwards to a snapshotter only labels under `containerd.io/snapshot/`; the
//! names of the remote-snapshot protocol are containerd's (`snapshots` and `pkg/snapshotters`).

/// Name under which the snapshotter may commit the layer itself.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// Label on a lazily mounted layer's snapshot: the rule that admitted its Beam artifact
/// ("bound by the image manifest", or a trusted repository's referrer), for `beam pull`.
pub const ADMITTED: &str = "dev.beam.lazy.admitted";

/// Prepare label carrying `beam pull`'s registry settings (a `PullTransport`) as JSON.
/// containerd passes a snapshotter only
/// labels under `containerd.io/snapshot/`, and on CRI pulls it also passes layer annotations
/// under that prefix, which an image author controls. So the daemon honours this label only on
/// a Prepare whose key `beam pull` made ([`PULL_KEY_PREFIX`]: containerd's unpacker names its
/// keys `extract-…`, and no image can choose a key).
pub const PULL_TRANSPORT: &str = "containerd.io/snapshot/beam.pull-transport";

/// Prepare labels of `beam pull` carrying the image manifest and its bound Beam artifact
/// manifest (their bytes, JSON), which the pull has fetched anyway: the daemon then asks the
/// registry for neither (two round trips fewer before a layer mounts). Content-addressed: the
/// daemon uses one only when its digest is the one it would have fetched, so anyone may set
/// them. Split over several labels ([`split`]: a manifest of a few layers is over one
/// label's 4 KiB); left out when larger than [`MAX_PARTS`] labels; never kept on the snapshot.
pub const PULL_MANIFEST: &str = "containerd.io/snapshot/beam.pull-manifest";
pub const PULL_ARTIFACT: &str = "containerd.io/snapshot/beam.pull-artifact";

/// containerd's limit on one label: key and value at most 4096 bytes together.
const MAX_LABEL: usize = 4096;

/// Whether a label fits containerd's limit (key and value at most 4096 bytes together).
pub fn fits(key: &str, value: &str) -> bool {
    key.len() + value.len() <= MAX_LABEL
}

/// Most labels one value is split into by [`split`] (about 64 KiB in all).
pub const MAX_PARTS: usize = 16;

/// `value` as labels that each fit containerd's limit: its first part under `key`, the next
/// under `key.1`, `key.2`, ...; none when it would take more than [`MAX_PARTS`]. An image
/// manifest of a few layers with its annotations, or a Beam artifact, is over 4 KiB.
pub fn split(key: &str, value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() || out.is_empty() {
        if out.len() == MAX_PARTS {
            return Vec::new();
        }
        let k = match out.len() {
            0 => key.to_string(),
            n => format!("{key}.{n}"),
        };
        let mut at = rest.len().min(MAX_LABEL - k.len());
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        out.push((k, rest[..at].to_string()));
        rest = &rest[at..];
    }
    out
}

/// The value [`split`] wrote under `key`, joined again.
pub fn joined(labels: &std::collections::BTreeMap<String, String>, key: &str) -> Option<String> {
    let mut value = labels.get(key)?.clone();
    for n in 1..MAX_PARTS {
        match labels.get(&format!("{key}.{n}")) {
            Some(part) => value.push_str(part),
            None => break,
        }
    }
    Some(value)
}

/// Remove the labels [`split`] wrote under `key`.
pub fn remove_split(labels: &mut std::collections::BTreeMap<String, String>, key: &str) {
    labels.remove(key);
    for n in 1..MAX_PARTS {
        labels.remove(&format!("{key}.{n}"));
    }
}

/// How `beam pull` begins its Prepare keys (the daemon sees `NAMESPACE/ID/KEY`).
pub const PULL_KEY_PREFIX: &str = "beam-pull-";

/// Whether the backend snapshot key `key` (`NAMESPACE/ID/KEY` as containerd passes it, or a
/// bare key from a direct client) was made by `beam pull`.
pub fn is_pull_key(key: &str) -> bool {
    let bare = key.splitn(3, '/').nth(2).filter(|_| {
        key.split('/')
            .nth(1)
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
    });
    bare.unwrap_or(key).starts_with(PULL_KEY_PREFIX)
}

/// Labels Beam adds to a layer's ordinary (fallback) snapshot, so that the client that asked
/// for a lazy layer (`beam pull`, through containerd's Stat of the active key) can say why it
/// was not lazy and what to change.
pub mod fallback {
    /// Why the layer was not mounted lazily.
    pub const REASON: &str = "dev.beam.lazy.fallback";
    /// The setting to change, when the cause is one.
    pub const FIX: &str = "dev.beam.lazy.fix";
    /// Longest value written (containerd limits a label to 4 KiB, name included).
    const MAX_VALUE: usize = 3000;

    /// The labels saying `reason` and `fix` (none for an empty fix), cut to fit.
    pub fn for_reason(reason: &str, fix: &str) -> Vec<(String, String)> {
        let cut = |s: &str| {
            let mut at = s.len().min(MAX_VALUE);
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s[..at].to_string()
        };
        let mut out = vec![(REASON.to_string(), cut(reason))];
        if !fix.is_empty() {
            out.push((FIX.to_string(), cut(fix)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_beam_pull_makes_carry_pull_settings() {
        assert!(is_pull_key("default/12/beam-pull-1-abcd sha256:00"));
        assert!(is_pull_key("beam-pull-1-abcd sha256:00"));
        assert!(!is_pull_key("k8s.io/3/extract-1-ab sha256:00"));
        assert!(!is_pull_key("k8s.io/x/beam-pull-1"));
    }

    #[test]
    fn a_long_value_is_split_into_labels_that_fit_and_joined_again() {
        let key = PULL_ARTIFACT;
        for value in ["", "{}", &"é".repeat(5000), &"x".repeat(4096 * 3)] {
            let parts = split(key, value);
            assert!(!parts.is_empty());
            assert!(parts.iter().all(|(k, v)| fits(k, v)));
            let mut labels: std::collections::BTreeMap<String, String> =
                parts.into_iter().collect();
            labels.insert("other".into(), "kept".into());
            assert_eq!(joined(&labels, key).as_deref(), Some(value));
            remove_split(&mut labels, key);
            assert_eq!(labels.len(), 1, "only the other label is left");
        }
        assert!(
            split(key, &"x".repeat(MAX_PARTS * 4096)).is_empty(),
            "too long"
        );
        assert_eq!(joined(&Default::default(), key), None);
    }

    #[test]
    fn fallback_labels_fit_containerds_limit() {
        let long = "é".repeat(4000);
        let l = fallback::for_reason(&long, "");
        assert_eq!(l.len(), 1, "no fix label for an empty fix");
        assert!(l[0].1.len() <= 3000 && l[0].1.chars().all(|c| c == 'é'));
        assert_eq!(
            fallback::for_reason("r", "f")[1],
            (fallback::FIX.into(), "f".into())
        );
    }
}

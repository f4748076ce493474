//! Which pushed tags are converted: the operator's include and exclude patterns, and the tags
//! that are never images to convert (Beam's own output and other tools' referrers).

use globset::{GlobBuilder, GlobMatcher};

/// Include and exclude patterns over `REPOSITORY:TAG`.
///
/// Patterns are globs: `*` stays within one path segment, `**` crosses `/`, `?` is one
/// character. A pattern is `REPO_GLOB[:TAG_GLOB]`, matched part by part; without `:` it names
/// repositories, any tag (`team/**` = `team/**:*`). A tag is converted when it matches an
/// include pattern (none given: every tag) and no exclude pattern.
#[derive(Debug, Clone)]
pub struct Rules {
    include: Option<Vec<Pattern>>,
    exclude: Vec<Pattern>,
    text: (Vec<String>, Vec<String>),
}

/// One `REPO_GLOB[:TAG_GLOB]`.
#[derive(Debug, Clone)]
struct Pattern {
    repository: GlobMatcher,
    tag: Option<GlobMatcher>,
}

impl Pattern {
    fn matches(&self, repository: &str, tag: &str) -> bool {
        self.repository.is_match(repository) && self.tag.as_ref().is_none_or(|t| t.is_match(tag))
    }
}

/// A pattern that is not a glob.
#[derive(Debug, thiserror::Error)]
#[error("invalid pattern {pattern:?}: {source}")]
pub struct RuleError {
    pattern: String,
    source: globset::Error,
}

fn build(patterns: &[String]) -> Result<Vec<Pattern>, RuleError> {
    let glob = |p: &str, whole: &str| {
        GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map(|g| g.compile_matcher())
            .map_err(|source| RuleError {
                pattern: whole.to_string(),
                source,
            })
    };
    patterns
        .iter()
        .map(|p| {
            let (repo, tag) = match p.rsplit_once(':') {
                Some((r, t)) => (r, Some(t)),
                None => (p.as_str(), None),
            };
            Ok(Pattern {
                repository: glob(repo, p)?,
                tag: tag.map(|t| glob(t, p)).transpose()?,
            })
        })
        .collect()
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(&[], &[]).expect("no patterns is valid")
    }
}

impl Rules {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, RuleError> {
        Ok(Rules {
            include: if include.is_empty() {
                None
            } else {
                Some(build(include)?)
            },
            exclude: build(exclude)?,
            text: (include.to_vec(), exclude.to_vec()),
        })
    }

    /// Why `repository:tag` is not converted, or None when it is.
    pub fn refuses(&self, repository: &str, tag: &str) -> Option<String> {
        if let Some(why) = not_an_image_tag(tag) {
            return Some(why.into());
        }
        if let Some(inc) = &self.include {
            if !inc.iter().any(|p| p.matches(repository, tag)) {
                return Some(format!(
                    "matches no include pattern ({})",
                    self.text.0.join(", ")
                ));
            }
        }
        if self.exclude.iter().any(|p| p.matches(repository, tag)) {
            return Some(format!(
                "matches an exclude pattern ({})",
                self.text.1.join(", ")
            ));
        }
        None
    }
}

/// Tags that name no image a user pushed: the referrers fallback tags (`sha256-<hex>`, which
/// Beam itself writes for its artifacts) and cosign's signature, attestation and SBOM tags
/// (`sha256-<hex>.sig`, `.att`, `.sbom`). Converting them would loop on our own output or
/// convert another tool's metadata.
pub fn not_an_image_tag(tag: &str) -> Option<&'static str> {
    let rest = tag.strip_prefix("sha256-")?;
    let hex = rest.split('.').next().unwrap_or("");
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some("a referrers or signature tag (sha256-<digest>), not an image")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn include_and_exclude() {
        let r = Rules::new(&s(&["team/*", "base:v*"]), &s(&["team/*:*-debug"])).unwrap();
        assert_eq!(r.refuses("team/api", "v1"), None);
        assert_eq!(r.refuses("base", "v2"), None);
        assert!(r.refuses("base", "latest").is_some());
        assert!(r
            .refuses("team/api", "v1-debug")
            .unwrap()
            .contains("exclude"));
        // `*` does not cross `/`.
        assert!(r.refuses("team/a/b", "v1").unwrap().contains("include"));
        let all = Rules::default();
        assert_eq!(all.refuses("any/deep/repo", "x"), None);
        let deep = Rules::new(&s(&["team/**"]), &[]).unwrap();
        assert_eq!(deep.refuses("team/a/b", "v1"), None);
    }

    #[test]
    fn referrer_and_signature_tags_are_never_converted() {
        let hex = "a".repeat(64);
        let r = Rules::default();
        assert!(r.refuses("x", &format!("sha256-{hex}")).is_some());
        assert!(r.refuses("x", &format!("sha256-{hex}.sig")).is_some());
        assert_eq!(r.refuses("x", "sha256-notadigest"), None);
    }

    #[test]
    fn bad_pattern_is_an_error() {
        assert!(Rules::new(&s(&["a[b"]), &[]).is_err());
    }
}

//! containerd's filter syntax, as `ctr snapshots ls` and CRI send it to List/Walk.
//!
//! A request carries several filter strings; a snapshot matches if it matches any of them. A
//! filter string is comma-separated selectors, all of which must match. A selector is
//! `FIELD`, `FIELD==VALUE`, `FIELD!=VALUE` or `FIELD~=REGEX`; FIELD is `name`, `parent`,
//! `kind` or `labels.KEY` (KEY may be quoted: `labels."a.b/c"`); VALUE may be quoted.
//! (containerd's `filters` package.) Regex selectors are matched as substring tests here.

use super::SnapshotError;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Like(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    field: Vec<String>,
    op: Op,
}

/// A parsed set of filters (OR of ANDs).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    any_of: Vec<Vec<Selector>>,
}

/// The fields of a snapshot a filter can see.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('`') && s.ends_with('`')))
    {
        s[1..s.len() - 1].replace("\\\"", "\"")
    } else {
        s.to_string()
    }
}

/// Split on `sep` outside quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match (c, quote) {
            ('\\', Some(_)) => {
                cur.push(c);
                escaped = true;
            }
            ('"' | '`', None) => {
                quote = Some(c);
                cur.push(c);
            }
            (q, Some(open)) if q == open => {
                quote = None;
                cur.push(c);
            }
            (c, None) if c == sep => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_selector(s: &str) -> Result<Selector, SnapshotError> {
    let bad = || SnapshotError::InvalidArgument(format!("invalid filter selector {s:?}"));
    let (field, op) = if let Some(i) = find_op(s, "==") {
        (&s[..i], Op::Eq(unquote(&s[i + 2..])))
    } else if let Some(i) = find_op(s, "!=") {
        (&s[..i], Op::Ne(unquote(&s[i + 2..])))
    } else if let Some(i) = find_op(s, "~=") {
        (&s[..i], Op::Like(unquote(&s[i + 2..])))
    } else {
        (s, Op::Present)
    };
    let parts = split_outside_quotes(field.trim(), '.');
    if parts.is_empty() || parts.iter().any(|p| p.trim().is_empty()) {
        return Err(bad());
    }
    let field: Vec<String> = parts.iter().map(|p| unquote(p)).collect();
    match field[0].as_str() {
        "name" | "parent" | "kind" if field.len() == 1 => {}
        "labels" if field.len() >= 2 => {}
        _ => return Err(bad()),
    }
    // A label key with dots that was not quoted: join the rest back.
    let field = if field[0] == "labels" && field.len() > 2 {
        vec!["labels".to_string(), field[1..].join(".")]
    } else {
        field
    };
    Ok(Selector { field, op })
}

/// Position of `op` outside quotes.
fn find_op(s: &str, op: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => quote = Some(c),
            None if s[i..].starts_with(op) => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

impl Filters {
    /// Parse the filter strings of a List request (empty: match everything).
    pub fn parse(filters: &[String]) -> Result<Self, SnapshotError> {
        let mut any_of = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            let mut all = Vec::new();
            for sel in split_outside_quotes(f, ',') {
                all.push(parse_selector(sel.trim())?);
            }
            any_of.push(all);
        }
        Ok(Filters { any_of })
    }

    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|s| s.matches(f)))
    }
}

impl Selector {
    fn matches(&self, f: &Fields<'_>) -> bool {
        let value: Option<&str> = match self.field[0].as_str() {
            "name" => Some(f.name),
            "parent" => Some(f.parent),
            "kind" => Some(f.kind),
            "labels" => f.labels.get(&self.field[1]).map(String::as_str),
            _ => None,
        };
        match &self.op {
            Op::Present => value.is_some_and(|v| !v.is_empty() || self.field[0] == "labels"),
            Op::Eq(want) => value == Some(want.as_str()),
            Op::Ne(want) => value != Some(want.as_str()),
            Op::Like(pat) => value.is_some_and(|v| v.contains(pat.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(labels: &'a BTreeMap<String, String>) -> Fields<'a> {
        Fields {
            name: "sha256:abc",
            parent: "p1",
            kind: "committed",
            labels,
        }
    }

    #[test]
    fn containerd_filter_forms() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/snapshot.ref".to_string(), "x".to_string());
        labels.insert("a".to_string(), "1".to_string());
        let f = fields(&labels);
        let m = |s: &[&str]| {
            Filters::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>())
                .unwrap()
                .matches(&f)
        };
        assert!(m(&[]));
        assert!(m(&["name==sha256:abc"]));
        assert!(m(&["parent==p1,kind==committed"]));
        assert!(!m(&["parent==p1,kind==active"]));
        assert!(
            m(&["kind==active", "name==sha256:abc"]),
            "OR across strings"
        );
        assert!(m(&[r#"labels."containerd.io/snapshot.ref""#]));
        assert!(m(&[r#"labels."containerd.io/snapshot.ref"==x"#]));
        assert!(m(&["labels.a==1"]));
        assert!(!m(&["labels.b"]));
        assert!(m(&["labels.a!=2"]));
        assert!(m(&["name~=abc"]));
        assert!(m(&[r#"name=="sha256:abc""#]));
        assert!(Filters::parse(&["bogus==1".into()]).is_err());
        assert!(Filters::parse(&["labels".into()]).is_err());
    }
}

//! containerd's filter syntax, as `ctr snapshots ls`, CRI and containerd's garbage collector
//! send it to List (Walk). A port of containerd's `filters` package (scanner, parser, quoting)
//! and of the snapshot adaptor of `snapshots/storage`, so that a filter selects here exactly
//! what it selects in containerd's overlayfs snapshotter, including the corners: what is a
//! syntax error (InvalidArgument) and what merely matches nothing.
//!
//! A request carries several filter strings; a snapshot matches if any of them matches (no
//! strings, or an empty string, matches everything). A filter string is comma-separated
//! selectors, all of which must match: `FIELDPATH`, `FIELDPATH==VALUE`, `FIELDPATH!=VALUE` or
//! `FIELDPATH~=REGEX`. A field path is dot-separated fields (`[A-Za-z0-9_-]+` or a
//! double-quoted string: `labels."a.b/c"`); a value is a run of non-space, non-comma characters
//! or a quoted string (`"..."`, and for `~=` also `/.../` and `|...|`).
//!
//! What the fields are (the adaptor): `name`, `parent` (present even when empty) and `kind`
//! (`active`, `view`, `committed`); `labels.KEY` is present when the label is set (the rest of
//! the path joined with dots is the key). Any other field is absent. `==` needs the field
//! present; `!=` and `~=` compare the field's value, the empty string when absent; a regex that
//! does not compile matches nothing (containerd logs it and moves on).

use super::re2::{self, Regex};
use super::SnapshotError;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    /// The expression, or why it did not compile.
    Matches(Result<Regex, re2::Error>),
}

#[derive(Debug, Clone)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

/// A parsed set of filters (any of them; each one all of its selectors).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// `None`: no filter strings, everything matches.
    any_of: Option<Vec<Vec<Selector>>>,
}

/// The fields of a snapshot a filter can see.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Fields<'_> {
    /// containerd's `adaptSnapshot`: the value of a field path and whether it is present.
    fn field(&self, path: &[String]) -> (&str, bool) {
        match path.first().map(String::as_str) {
            Some("kind") => (self.kind, true),
            Some("name") => (self.name, true),
            Some("parent") => (self.parent, true),
            Some("labels") => {
                if self.labels.is_empty() {
                    return ("", false);
                }
                match self.labels.get(&path[1..].join(".")) {
                    Some(v) => (v.as_str(), true),
                    None => ("", false),
                }
            }
            _ => ("", false),
        }
    }
}

impl Filters {
    /// Parse the filter strings of a List request (containerd's `filters.ParseAll`).
    pub fn parse(filters: &[String]) -> Result<Self, SnapshotError> {
        if filters.is_empty() {
            return Ok(Filters { any_of: None });
        }
        let mut any_of = Vec::new();
        for f in filters {
            let all = parse_one(f).map_err(|e| SnapshotError::InvalidArgument(format!("{e}")))?;
            any_of.push(all);
        }
        Ok(Filters {
            any_of: Some(any_of),
        })
    }

    pub fn matches(&self, f: &Fields<'_>) -> bool {
        match &self.any_of {
            None => true,
            Some(any) => any.iter().any(|all| all.iter().all(|s| s.matches(f))),
        }
    }
}

impl Selector {
    fn matches(&self, f: &Fields<'_>) -> bool {
        let (value, present) = f.field(&self.fieldpath);
        match &self.op {
            Op::Present => present,
            Op::Eq(want) => present && value == want,
            Op::Ne(want) => value != want,
            Op::Matches(Ok(re)) => re.is_match(value),
            Op::Matches(Err(e)) => {
                tracing::error!("error compiling regexp in filter: {e}");
                false
            }
        }
    }
}

/// An error of one filter string, shown as containerd shows it.
#[derive(Debug)]
struct ParseError {
    input: String,
    /// Byte offset.
    pos: usize,
    msg: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.input.get(self.pos..).and_then(|s| s.chars().next());
        match at {
            Some(c) => write!(
                f,
                "filters: parse error: [{} >|{}|< {}]: {}",
                &self.input[..self.pos],
                c,
                &self.input[self.pos + c.len_utf8()..],
                self.msg
            ),
            None => write!(f, "filters: parse error: [{}]: {}", self.input, self.msg),
        }
    }
}

/// containerd's `filters.Parse`: the selectors of one filter string (none for `""`).
fn parse_one(input: &str) -> Result<Vec<Selector>, ParseError> {
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let mut p = Parser {
        input,
        s: Scanner {
            input,
            pos: 0,
            ppos: 0,
            value: false,
            err: String::new(),
        },
    };
    p.selectors()
}

/// What the scanner reads next: a character, the end, or something it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rune {
    Ch(char),
    Eof,
    Illegal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Eof,
    Quoted,
    Value,
    Field,
    Separator,
    Operator,
    Illegal,
    Other,
}

struct Scanner<'a> {
    input: &'a str,
    /// Start of the current rune.
    pos: usize,
    /// End of the current rune.
    ppos: usize,
    /// After an operator: the next token is a value.
    value: bool,
    err: String,
}

impl Scanner<'_> {
    fn next(&mut self) -> Rune {
        self.pos = self.ppos;
        let Some(c) = self.input[self.ppos..].chars().next() else {
            return Rune::Eof;
        };
        self.ppos += c.len_utf8();
        if c == '\0' {
            self.error("unexpected null");
            return Rune::Illegal;
        }
        Rune::Ch(c)
    }

    fn peek(&mut self) -> Rune {
        let (pos, ppos) = (self.pos, self.ppos);
        let r = self.next();
        self.pos = pos;
        self.ppos = ppos;
        r
    }

    fn error(&mut self, msg: &str) {
        if self.err.is_empty() {
            self.err = msg.to_string();
        }
    }

    /// The next token: its position, kind and text.
    fn scan(&mut self) -> (usize, Tok, String) {
        let mut ch = self.next();
        let mut pos = self.pos;
        loop {
            let c = match ch {
                Rune::Eof => return (self.pos, Tok::Eof, String::new()),
                Rune::Illegal => return (self.pos, Tok::Illegal, String::new()),
                Rune::Ch(c) => c,
            };
            if is_quote_rune(c) {
                let ok = self.scan_quoted(c);
                let text = self.input[pos..self.ppos].to_string();
                return (pos, if ok { Tok::Quoted } else { Tok::Illegal }, text);
            }
            if is_separator_rune(c) {
                self.value = false;
                return (pos, Tok::Separator, self.input[pos..self.ppos].to_string());
            }
            if is_operator_rune(c) {
                while matches!(self.peek(), Rune::Ch('=' | '!' | '~')) {
                    self.next();
                }
                self.value = true;
                return (pos, Tok::Operator, self.input[pos..self.ppos].to_string());
            }
            if c.is_whitespace() {
                ch = self.next();
                pos = self.pos;
                continue;
            }
            if self.value {
                while matches!(self.peek(), Rune::Ch(c) if is_value_rune(c)) {
                    self.next();
                }
                self.value = false;
                return (pos, Tok::Value, self.input[pos..self.ppos].to_string());
            }
            if is_field_rune(c) {
                while matches!(self.peek(), Rune::Ch(c) if is_field_rune(c)) {
                    self.next();
                }
                return (pos, Tok::Field, self.input[pos..self.ppos].to_string());
            }
            return (self.pos, Tok::Other, String::new());
        }
    }

    fn scan_quoted(&mut self, quote: char) -> bool {
        let mut illegal = false;
        let mut ch = self.next();
        while ch != Rune::Ch(quote) {
            match ch {
                Rune::Ch('\n') | Rune::Eof | Rune::Illegal => {
                    self.error("quoted literal not terminated");
                    return false;
                }
                Rune::Ch('\\') => {
                    let (next, legal) = self.scan_escape(quote);
                    ch = next;
                    if !legal {
                        illegal = true;
                    }
                }
                Rune::Ch(_) => ch = self.next(),
            }
        }
        !illegal
    }

    fn scan_escape(&mut self, quote: char) -> (Rune, bool) {
        let ch = self.next();
        match ch {
            Rune::Ch('a' | 'b' | 'f' | 'n' | 'r' | 't' | 'v' | '\\') => (self.next(), true),
            Rune::Ch(c) if c == quote => (self.next(), true),
            Rune::Ch('0'..='7') => self.scan_digits(ch, 8, 3),
            Rune::Ch('x') => {
                let first = self.next();
                self.scan_digits(first, 16, 2)
            }
            Rune::Ch('u') => {
                let first = self.next();
                self.scan_digits(first, 16, 4)
            }
            Rune::Ch('U') => {
                let first = self.next();
                self.scan_digits(first, 16, 8)
            }
            _ => {
                self.error("illegal escape sequence");
                (ch, false)
            }
        }
    }

    fn scan_digits(&mut self, mut ch: Rune, base: u32, mut n: u32) -> (Rune, bool) {
        while n > 0 && digit_val(ch) < base {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
            return (ch, false);
        }
        (ch, true)
    }
}

fn digit_val(r: Rune) -> u32 {
    match r {
        Rune::Ch(c) => c.to_digit(16).unwrap_or(16),
        _ => 16,
    }
}

fn is_field_rune(c: char) -> bool {
    c == '-' || c == '_' || c.is_ascii_alphanumeric()
}

fn is_operator_rune(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote_rune(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_separator_rune(c: char) -> bool {
    matches!(c, ',' | '.')
}

/// Go's `r != ',' && !IsSpace(r) && (IsLetter || IsDigit || IsNumber || IsGraphic || IsPunct)`.
fn is_value_rune(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

struct Parser<'a> {
    input: &'a str,
    s: Scanner<'a>,
}

impl Parser<'_> {
    fn err(&self, pos: usize, msg: impl Into<String>) -> ParseError {
        ParseError {
            input: self.input.to_string(),
            pos,
            msg: msg.into(),
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, ParseError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.s.peek() {
                Rune::Ch(',') => {
                    let (pos, tok, _) = self.s.scan();
                    if tok != Tok::Separator {
                        return Err(self.err(pos, "expected a separator"));
                    }
                    all.push(self.selector()?);
                }
                Rune::Eof => break,
                other => {
                    let shown = match other {
                        Rune::Ch(c) => c.to_string(),
                        _ => "illegal".to_string(),
                    };
                    return Err(self.err(self.s.ppos, format!("unexpected input: {shown}")));
                }
            }
        }
        Ok(all)
    }

    fn selector(&mut self) -> Result<Selector, ParseError> {
        let fieldpath = self.fieldpath()?;
        if matches!(self.s.peek(), Rune::Ch(',') | Rune::Eof) {
            return Ok(Selector {
                fieldpath,
                op: Op::Present,
            });
        }
        let (pos, tok, text) = self.s.scan();
        let op = match tok {
            Tok::Operator => match text.as_str() {
                "==" | "!=" | "~=" => text,
                _ => return Err(self.err(pos, format!("unsupported operator {text:?}"))),
            },
            Tok::Illegal => return Err(self.err(pos, self.s.err.clone())),
            _ => return Err(self.err(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        };
        let value = self.value(op == "~=")?;
        let op = match op.as_str() {
            "==" => Op::Eq(value),
            "!=" => Op::Ne(value),
            _ => Op::Matches(Regex::new(&value)),
        };
        Ok(Selector { fieldpath, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, ParseError> {
        let mut fields = vec![self.field()?];
        while self.s.peek() == Rune::Ch('.') {
            let (pos, tok, _) = self.s.scan();
            if tok != Tok::Separator {
                return Err(self.err(pos, "expected a field separator (`.`)"));
            }
            fields.push(self.field()?);
        }
        Ok(fields)
    }

    fn field(&mut self) -> Result<String, ParseError> {
        let (pos, tok, text) = self.s.scan();
        match tok {
            Tok::Field => Ok(text),
            Tok::Quoted => self.unquote(pos, &text, false),
            Tok::Illegal => Err(self.err(pos, self.s.err.clone())),
            _ => Err(self.err(pos, "expected field or quoted")),
        }
    }

    fn value(&mut self, allow_alt_quotes: bool) -> Result<String, ParseError> {
        let (pos, tok, text) = self.s.scan();
        match tok {
            Tok::Value | Tok::Field => Ok(text),
            Tok::Quoted => self.unquote(pos, &text, allow_alt_quotes),
            Tok::Illegal => Err(self.err(pos, self.s.err.clone())),
            _ => Err(self.err(pos, "expected value or quoted")),
        }
    }

    fn unquote(&self, pos: usize, s: &str, allow_alts: bool) -> Result<String, ParseError> {
        if !allow_alts && !s.starts_with(['\'', '"']) {
            return Err(self.err(pos, "invalid quote encountered"));
        }
        unquote(s).map_err(|()| self.err(pos, "unquoting failed: quote syntax error"))
    }
}

/// containerd's `unquote`: Go's `strconv.Unquote` with `/` and `|` as extra double quotes.
fn unquote(s: &str) -> Result<String, ()> {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() < 2 {
        return Err(());
    }
    let quote = chars[0];
    if quote != chars[chars.len() - 1] {
        return Err(());
    }
    let body = &chars[1..chars.len() - 1];
    if quote == '`' {
        if body.contains(&'`') {
            return Err(());
        }
        return Ok(body.iter().filter(|c| **c != '\r').collect());
    }
    if !matches!(quote, '"' | '\'' | '|' | '/') || body.contains(&'\n') {
        return Err(());
    }
    let mut out: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c == quote {
            return Err(());
        }
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let Some(&e) = body.get(i) else {
            return Err(());
        };
        i += 1;
        let simple = match e {
            'a' => Some(0x07u8),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            '\'' | '"' | '|' | '/' if e == quote => Some(e as u8),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        match e {
            'x' | 'u' | 'U' => {
                let n = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let digits: String = body.get(i..i + n).ok_or(())?.iter().collect();
                i += n;
                let v = u32::from_str_radix(&digits, 16).map_err(|_| ())?;
                if digits.chars().any(|d| !d.is_ascii_hexdigit()) {
                    return Err(());
                }
                if e == 'x' {
                    out.push(v as u8);
                } else {
                    let c = char::from_u32(v).ok_or(())?;
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            '0'..='7' => {
                let mut v = e as u32 - '0' as u32;
                for _ in 0..2 {
                    let d = body.get(i).and_then(|d| d.to_digit(8)).ok_or(())?;
                    v = v * 8 + d;
                    i += 1;
                }
                if v > 255 {
                    return Err(());
                }
                out.push(v as u8);
            }
            _ => return Err(()),
        }
        if quote == '\'' && i < body.len() {
            return Err(());
        }
    }
    // `\x` escapes may make bytes that are not UTF-8; such a value equals no field.
    Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matches(filters: &[&str], f: &Fields<'_>) -> bool {
        Filters::parse(&filters.iter().map(|x| x.to_string()).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{filters:?}: {e}"))
            .matches(f)
    }

    #[test]
    fn containerd_filter_forms() {
        let l = labels(&[
            ("containerd.io/snapshot.ref", "x"),
            ("a", "1"),
            ("a.b", "2"),
        ]);
        let f = Fields {
            name: "sha256:abc",
            parent: "p1",
            kind: "committed",
            labels: &l,
        };
        let m = |s: &[&str]| matches(s, &f);
        assert!(m(&[]));
        assert!(m(&[""]), "an empty filter string matches everything");
        assert!(m(&["", "name==nothing"]));
        assert!(m(&["name==sha256:abc"]));
        assert!(m(&["parent==p1,kind==committed"]));
        assert!(m(&["parent==p1, kind==committed"]), "space after a comma");
        assert!(m(&["name == sha256:abc"]), "spaces around an operator");
        assert!(!m(&["parent==p1,kind==active"]));
        assert!(
            m(&["kind==active", "name==sha256:abc"]),
            "OR across strings"
        );
        assert!(m(&[r#"labels."containerd.io/snapshot.ref""#]));
        assert!(m(&[r#"labels."containerd.io/snapshot.ref"==x"#]));
        assert!(m(&["labels.a==1"]) && m(&["labels.a.b==2"]) && m(&[r#"labels."a.b"==2"#]));
        assert!(!m(&["labels.b"]));
        assert!(m(&["labels.a!=2"]));
        assert!(m(&[r#"name=="sha256:abc""#]));
        assert!(m(&["name~=abc"]) && m(&["name~=^sha256:[a-c]+$"]) && !m(&["name~=^abc"]));
        assert!(
            m(&["name~=/^sha/"]) && m(&["name~=|c$|"]),
            "alternative quotes for ~="
        );
        // Fields containerd does not know are absent, not errors.
        assert!(!m(&["bogus==1"]) && !m(&["labels"]) && m(&["bogus!=1"]));
        // `!=` compares the empty string when absent; `==` needs presence.
        assert!(m(&["labels.missing!=x"]) && !m(&[r#"labels.missing!="""#]));
        assert!(!m(&[r#"labels.missing=="""#]));
        // A regex that does not compile matches nothing.
        assert!(!m(&["name~=(("]) && !m(&["name~=[z-a]"]));
    }

    #[test]
    fn regex_selectors_read_re2_syntax() {
        let l = labels(&[("digit", "\u{663}"), ("word", "é1"), ("re", "a.*b")]);
        let f = Fields {
            name: "Ωmega-7",
            parent: "",
            kind: "active",
            labels: &l,
        };
        let m = |s: &str| matches(&[s], &f);
        assert!(m(r"name~=^\pL") && m(r"name~=^\p{Greek}") && !m(r"name~=^\PL"));
        assert!(m(r"labels.re~=^\Qa.*b\E$") && !m(r"name~=\Q.*\E"));
        // Go's \d is ASCII: U+0663 ARABIC-INDIC DIGIT THREE is no \d, though a Unicode digit.
        assert!(!m(r"labels.digit~=\d") && m(r"labels.digit~=\p{Nd}") && m(r"name~=\d$"));
        // Go's \b is ASCII too: é is no word character, so a boundary comes before the 1.
        assert!(m(r"labels.word~=\b1") && !m(r"labels.word~=\w1"));
        assert!(
            m(r"name~=^\W") && m(r"name~=a\b"),
            "Ω is no word character either"
        );
        // RE2 refuses counts over 1000: the selector matches nothing, the string still parses.
        assert!(m("name~=7{1000}|7$") && !m("name~=7{1001}|7$"));
        assert!(m("name~=/^Ωmega-7{1,1000}$/") && !m("name~=/^Ωmega-7{1,1001}$/"));
        assert!(
            !m(r"name!=x,name~=\pX"),
            "an unknown class compiles to no match"
        );
    }

    #[test]
    fn parent_and_name_are_always_present() {
        let l = BTreeMap::new();
        let f = Fields {
            name: "n",
            parent: "",
            kind: "active",
            labels: &l,
        };
        assert!(
            matches(&["parent"], &f),
            "parent is present even when empty"
        );
        assert!(matches(&[r#"parent=="""#], &f));
        assert!(!matches(&[r#"parent!="""#], &f));
        assert!(!matches(&["labels.a!=x,labels.a"], &f), "no labels: absent");
        assert!(matches(&["kind==active"], &f));
    }

    #[test]
    fn syntax_errors_are_invalid_arguments() {
        for bad in [
            "name==",
            "name=x",
            "name===x",
            "=x",
            "name==x y",
            "name==x ,kind==y",
            " ",
            "labels.",
            ".a",
            "name==/abs/path",
            r#"labels.'a'"#,
            r#"name=="unterminated"#,
            r#"name=="\d""#,
            r#"name~=/\d/"#,
            "labels./a/",
            "name\0==x",
        ] {
            match Filters::parse(&[bad.to_string()]) {
                Err(SnapshotError::InvalidArgument(msg)) => {
                    assert!(msg.contains("parse error"), "{bad:?}: {msg}")
                }
                other => panic!("{bad:?} should be a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn unquoting() {
        assert_eq!(unquote(r#""a\"b""#), Ok("a\"b".into()));
        assert_eq!(unquote(r#""\x41\u263a\101\n""#), Ok("A\u{263a}A\n".into()));
        assert_eq!(unquote(r"/a\/b/"), Ok("a/b".into()));
        assert_eq!(unquote(r#""a\/b""#), Err(()), "\\/ only inside /.../");
        assert_eq!(unquote("\"a"), Err(()));
    }
}

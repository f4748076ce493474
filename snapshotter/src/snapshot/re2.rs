//! Regular expressions for the `~=` filter operator. containerd compiles the value with Go's
//! `regexp` (RE2 syntax with Perl flags) and asks `MatchString`: does the expression match
//! anywhere in the field. We match with the `regex` crate, whose engine has the same
//! guarantee (time linear in the text, so no filter can make List hang), after a translation of
//! the syntax: the two dialects look alike but differ in places a client can reach.
//!
//! The translator reads RE2 syntax the way Go's `regexp/syntax` parser does and writes an
//! equivalent expression for the `regex` crate:
//! - Go's `\d \s \w \b \B` and `[[:alpha:]]`-style classes are ASCII-only; the crate's are
//!   Unicode. Classes become explicit ASCII ranges, `\b`/`\B` become `(?-u:\b)`/`(?-u:\B)`.
//! - `\Q...\E`, literal `{` where no repetition parses (`a{,2}`), escaped punctuation such as
//!   `\<` (a literal in Go, a word boundary in the crate) and `[\d-z]` are rewritten to plain
//!   literals and classes.
//! - `\pL`, `\p{Greek}`, `\PL`, `\p{^Greek}` name a general category or a script, as in Go;
//!   the crate would also accept binary properties (`\p{Alphabetic}`) and would read a few
//!   names otherwise, so the translation names `gc=` or `sc=` explicitly and refuses the rest.
//! - What Go refuses is refused here too, with Go's wording: repetition counts above 1000 (and
//!   nested counts whose product is above 1000), stacked repetitions (`a**`), `\1`, `(?P=n)`,
//!   lookaround, unknown escapes and classes. Go's quirks are kept: a flag group is not a
//!   repetition operand (`a(?i)*` repeats `a`), `(?)` is an empty flag group.
//!
//! Remaining differences: case folding (`(?i)`) is simple case folding on both sides (so
//! `(?i)k` matches the Kelvin sign `K` in both), but from the crate's Unicode tables rather
//! than Go's, so characters of different Unicode versions may fold or classify differently.
//! Class names match loosely (case, `_`, `-` and spaces ignored: `\p{greek}`), as in current
//! Go; older Go wanted the exact name. Go allows nesting 1000 deep and about 3.3 million
//! compiled instructions; we refuse expressions nested deeper than the crate's 250 levels or
//! compiled larger than [`SIZE_LIMIT`], since filters come from clients. Those refusals are
//! errors, which the filter treats like any invalid expression (the selector matches nothing).

use std::fmt::Write as _;

/// Bound on the compiled program of one filter expression (the crate's default, stated here
/// because the expression comes from a client): `\pL{1000}` exceeds it, `[a-z]{1000}` does not.
pub const SIZE_LIMIT: usize = 10 << 20;

/// Deepest group nesting we translate: the `regex` crate's own nesting limit.
const NEST_LIMIT: usize = 250;

/// RE2's limit on one repetition count, and on the product of nested counts.
const MAX_REPEAT: u64 = 1000;

/// A compiled filter expression.
#[derive(Debug, Clone)]
pub struct Regex {
    re: regex::Regex,
}

impl Regex {
    /// Compile `expr` (RE2 syntax); the error says what is wrong with it.
    pub fn new(expr: &str) -> Result<Regex, Error> {
        let translated = translate(expr)?;
        let re = regex::RegexBuilder::new(&translated)
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(limit) => Error::TooLarge {
                    expr: expr.to_string(),
                    limit,
                },
                other => Error::Unsupported {
                    expr: expr.to_string(),
                    reason: other.to_string(),
                },
            })?;
        Ok(Regex { re })
    }

    /// Whether the expression matches anywhere in `text` (Go's `MatchString`).
    pub fn is_match(&self, text: &str) -> bool {
        self.re.is_match(text)
    }
}

/// Why an expression does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Go refuses it too; the message is Go's.
    #[error("error parsing regexp: {code}: `{expr}`")]
    Syntax { code: Code, expr: String },
    /// Go would compile it, but its program is larger than we build for a client.
    #[error("regexp {expr:?} is too large: its compiled form exceeds {limit} bytes")]
    TooLarge { expr: String, limit: usize },
    /// The `regex` crate refuses the translation (e.g. nested more than 250 levels deep).
    #[error("regexp {expr:?} is not supported: {reason}")]
    Unsupported { expr: String, reason: String },
}

/// Go's `regexp/syntax.ErrorCode`s this translator reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidCharRange,
    InvalidEscape,
    InvalidNamedCapture,
    InvalidPerlOp,
    InvalidRepeatOp,
    InvalidRepeatSize,
    MissingBracket,
    MissingParen,
    MissingRepeatArgument,
    TrailingBackslash,
    UnexpectedParen,
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Code::InvalidCharRange => "invalid character class range",
            Code::InvalidEscape => "invalid escape sequence",
            Code::InvalidNamedCapture => "invalid named capture",
            Code::InvalidPerlOp => "invalid or unsupported Perl syntax",
            Code::InvalidRepeatOp => "invalid nested repetition operator",
            Code::InvalidRepeatSize => "invalid repeat count",
            Code::MissingBracket => "missing closing ]",
            Code::MissingParen => "missing closing )",
            Code::MissingRepeatArgument => "missing argument to repetition operator",
            Code::TrailingBackslash => "trailing backslash at end of expression",
            Code::UnexpectedParen => "unexpected )",
        })
    }
}

fn syntax(code: Code, expr: &str) -> Error {
    Error::Syntax {
        code,
        expr: expr.to_string(),
    }
}

/// Go's Perl classes and POSIX classes: ASCII ranges, and whether the class is negated.
type Group = (&'static [(char, char)], bool);

const DIGIT: &[(char, char)] = &[('0', '9')];
/// Go's `\s` is `[\t\n\f\r ]`: no `\v`, unlike the crate's `(?-u:\s)`.
const PERL_SPACE: &[(char, char)] = &[('\t', '\n'), ('\x0c', '\r'), (' ', ' ')];
const WORD: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];

fn perl_group(c: char) -> Option<Group> {
    Some(match c {
        'd' => (DIGIT, false),
        'D' => (DIGIT, true),
        's' => (PERL_SPACE, false),
        'S' => (PERL_SPACE, true),
        'w' => (WORD, false),
        'W' => (WORD, true),
        _ => return None,
    })
}

/// `[:name:]` (or `[:^name:]`), with the brackets and colons.
fn posix_group(name: &str) -> Option<Group> {
    let (negated, bare) = match name.strip_prefix("[:^") {
        Some(rest) => (true, rest),
        None => (false, name.strip_prefix("[:")?),
    };
    let ranges: &'static [(char, char)] = match bare.strip_suffix(":]")? {
        "alnum" => &[('0', '9'), ('A', 'Z'), ('a', 'z')],
        "alpha" => &[('A', 'Z'), ('a', 'z')],
        "ascii" => &[('\0', '\x7f')],
        "blank" => &[('\t', '\t'), (' ', ' ')],
        "cntrl" => &[('\0', '\x1f'), ('\x7f', '\x7f')],
        "digit" => DIGIT,
        "graph" => &[('!', '~')],
        "lower" => &[('a', 'z')],
        "print" => &[(' ', '~')],
        "punct" => &[('!', '/'), (':', '@'), ('[', '`'), ('{', '~')],
        "space" => &[('\t', '\r'), (' ', ' ')],
        "upper" => &[('A', 'Z')],
        "word" => WORD,
        "xdigit" => &[('0', '9'), ('A', 'F'), ('a', 'f')],
        _ => return None,
    };
    Some((ranges, negated))
}

/// A class that matches no character (what a surrogate code point, which RE2 accepts in
/// `\x{D800}` but no UTF-8 text contains, matches).
const NOTHING: &str = r"[^\x{0}-\x{10FFFF}]";

fn push_char(out: &mut String, c: char) {
    if c.is_alphanumeric() || c == '_' {
        out.push(c);
    } else {
        let _ = write!(out, r"\x{{{:X}}}", c as u32);
    }
}

fn push_group(out: &mut String, (ranges, negated): Group) {
    out.push('[');
    if negated {
        out.push('^');
    }
    for &(lo, hi) in ranges {
        push_char(out, lo);
        if hi != lo {
            out.push('-');
            push_char(out, hi);
        }
    }
    out.push(']');
}

/// The range `lo..=hi` of code points (RE2 runes, surrogates allowed) as a class item; false if
/// it holds no character.
fn push_range(out: &mut String, lo: u32, hi: u32) -> bool {
    let lo = if (0xD800..=0xDFFF).contains(&lo) {
        0xE000
    } else {
        lo
    };
    let hi = if (0xD800..=0xDFFF).contains(&hi) {
        0xD7FF
    } else {
        hi
    };
    let (Some(l), Some(h)) = (char::from_u32(lo), char::from_u32(hi)) else {
        return false;
    };
    if l > h {
        return false;
    }
    push_char(out, l);
    if h != l {
        out.push('-');
        push_char(out, h);
    }
    true
}

/// One item of the translation at some nesting level.
struct Piece {
    text: String,
    kind: PieceKind,
    /// Product of the counted repetitions on the deepest path inside, as RE2's
    /// `repeatIsValid` sees it (0 under `{0}`).
    weight: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    /// A single operand: literal, class, group, anchor.
    Atom,
    /// An operand with a repetition operator applied.
    Repeated,
    /// A flag change `(?i)`: not an operand.
    Flags,
}

/// An open group.
struct Frame {
    /// `(`, `(?:` or `(?flags:`; empty for the whole expression.
    open: String,
    /// Finished alternatives.
    alts: Vec<String>,
    alts_weight: u64,
    /// The alternative being read.
    concat: Vec<Piece>,
}

impl Frame {
    fn new(open: String) -> Frame {
        Frame {
            open,
            alts: Vec::new(),
            alts_weight: 1,
            concat: Vec::new(),
        }
    }

    fn end_alternative(&mut self) {
        let concat = std::mem::take(&mut self.concat);
        let weight = concat.iter().map(|p| p.weight).max().unwrap_or(1);
        self.alts_weight = self.alts_weight.max(weight);
        self.alts.push(concat.into_iter().map(|p| p.text).collect());
    }

    /// The group as text, and its weight.
    fn finish(mut self) -> (String, u64) {
        self.end_alternative();
        let mut text = self.open;
        text.push_str(&self.alts.join("|"));
        (text, self.alts_weight)
    }
}

/// RE2 syntax to `regex` crate syntax that matches the same texts.
pub fn translate(expr: &str) -> Result<String, Error> {
    Translator {
        whole: expr,
        t: expr,
        frames: vec![Frame::new(String::new())],
    }
    .run()
}

struct Translator<'a> {
    whole: &'a str,
    /// The rest of the expression.
    t: &'a str,
    frames: Vec<Frame>,
}

impl<'a> Translator<'a> {
    fn frame(&mut self) -> &mut Frame {
        self.frames
            .last_mut()
            .expect("the whole expression's frame")
    }

    fn atom(&mut self, text: String) {
        self.frame().concat.push(Piece {
            text,
            kind: PieceKind::Atom,
            weight: 1,
        });
    }

    fn literal(&mut self, c: char) {
        let mut text = String::new();
        push_char(&mut text, c);
        self.atom(text);
    }

    /// Open a group; `at` is the expression from its `(` on.
    fn open_group(&mut self, open: String, at: &str) -> Result<(), Error> {
        // Each group's text is copied into its parent's when it closes: bounding the depth
        // bounds that work (and the crate refuses deeper nesting anyway).
        if self.frames.len() > NEST_LIMIT {
            return Err(Error::Unsupported {
                expr: self.whole.to_string(),
                reason: format!(
                    "groups nested more than {NEST_LIMIT} deep (at byte {})",
                    self.whole.len() - at.len()
                ),
            });
        }
        self.frames.push(Frame::new(open));
        Ok(())
    }

    fn bump(&mut self, n: usize) {
        self.t = &self.t[n..];
    }

    fn run(mut self) -> Result<String, Error> {
        // The repetition operator just read, if the last token was one (RE2's `lastRepeat`).
        let mut last_repeat: Option<&'a str> = None;
        while let Some(c) = self.t.chars().next() {
            let before = self.t;
            let mut repeat = None;
            match c {
                '(' if self.t.starts_with("(?") => self.perl_flags()?,
                '(' => {
                    self.bump(1);
                    self.open_group("(".into(), before)?;
                }
                '|' => {
                    self.bump(1);
                    self.frame().end_alternative();
                }
                ')' => {
                    self.bump(1);
                    if self.frames.len() < 2 {
                        return Err(syntax(Code::UnexpectedParen, self.whole));
                    }
                    let frame = self.frames.pop().expect("checked above");
                    let (mut text, weight) = frame.finish();
                    text.push(')');
                    self.frame().concat.push(Piece {
                        text,
                        kind: PieceKind::Atom,
                        weight,
                    });
                }
                '^' | '$' | '.' => {
                    self.bump(1);
                    self.atom(c.to_string());
                }
                '[' => {
                    let class = self.class()?;
                    self.atom(class);
                }
                '*' | '+' | '?' => {
                    self.bump(1);
                    let lazy = self.t.starts_with('?');
                    if lazy {
                        self.bump(1);
                    }
                    let op = &before[..before.len() - self.t.len()];
                    self.repeat(op, None, last_repeat, before)?;
                    repeat = Some(before);
                }
                '{' => match parse_repeat(self.t) {
                    None => {
                        self.bump(1);
                        self.literal('{');
                    }
                    Some((min, max, len)) => {
                        if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT || m < min) {
                            return Err(syntax(Code::InvalidRepeatSize, &self.t[..len]));
                        }
                        self.bump(len);
                        if self.t.starts_with('?') {
                            self.bump(1);
                        }
                        let op = &before[..before.len() - self.t.len()];
                        self.repeat(op, Some((min, max)), last_repeat, before)?;
                        repeat = Some(before);
                    }
                },
                '\\' => self.escape()?,
                c => {
                    self.bump(c.len_utf8());
                    self.literal(c);
                }
            }
            last_repeat = repeat;
        }
        if self.frames.len() != 1 {
            return Err(syntax(Code::MissingParen, self.whole));
        }
        let frame = self.frames.pop().expect("the whole expression's frame");
        Ok(frame.finish().0)
    }

    /// Apply the repetition `op` (its text, `{min,max}` counts when counted) to the last
    /// operand. `before` is the expression from the operator on.
    fn repeat(
        &mut self,
        op: &str,
        counts: Option<(u64, Option<u64>)>,
        last_repeat: Option<&str>,
        before: &str,
    ) -> Result<(), Error> {
        let after = &before[op.len()..];
        if let Some(last) = last_repeat {
            return Err(syntax(
                Code::InvalidRepeatOp,
                &last[..last.len() - after.len()],
            ));
        }
        let concat = &mut self.frame().concat;
        let Some(piece) = concat.iter_mut().rev().find(|p| p.kind != PieceKind::Flags) else {
            return Err(syntax(Code::MissingRepeatArgument, op));
        };
        if let Some((min, max)) = counts {
            // RE2's `repeatIsValid`: a factor per counted repetition, none under `{0}`.
            let factor = match max {
                Some(0) => 0,
                Some(m) => m,
                None => min.max(1),
            };
            let weight = factor * piece.weight;
            if (min >= 2 || max.is_some_and(|m| m >= 2)) && weight > MAX_REPEAT {
                return Err(syntax(Code::InvalidRepeatSize, op));
            }
            piece.weight = weight;
        }
        if piece.kind == PieceKind::Repeated {
            // RE2 repeats the repetition (`a*(?i)?` is `(a*)?`); the crate would read `a*?`.
            piece.text = format!("(?:{})", piece.text);
        }
        piece.text.push_str(op);
        piece.kind = PieceKind::Repeated;
        Ok(())
    }

    /// `(?` at the start: a named group, a flag group or a flag change.
    fn perl_flags(&mut self) -> Result<(), Error> {
        let s = self.t;
        let starts_with_p = s.len() > 4 && s[2..].starts_with("P<");
        let starts_with_name = s.len() > 3 && s[2..].starts_with('<');
        if starts_with_p || starts_with_name {
            let name_start = if starts_with_p { 4 } else { 3 };
            let Some(end) = s.find('>') else {
                return Err(syntax(Code::InvalidNamedCapture, s));
            };
            let name = &s[name_start..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(syntax(Code::InvalidNamedCapture, &s[..=end]));
            }
            // Only matching matters: the group need not capture (nor follow the crate's
            // rules for names).
            self.bump(end + 1);
            self.open_group("(?:".into(), s)?;
            return Ok(());
        }
        self.bump(2);
        let mut on = String::new();
        let mut off = String::new();
        let mut negated = false;
        let mut saw_flag = false;
        while let Some(c) = self.t.chars().next() {
            self.bump(c.len_utf8());
            match c {
                'i' | 'm' | 's' | 'U' => {
                    let set = if negated { &mut off } else { &mut on };
                    if !set.contains(c) {
                        set.push(c);
                    }
                    saw_flag = true;
                }
                '-' if !negated => {
                    negated = true;
                    saw_flag = false;
                }
                ':' | ')' if !negated || saw_flag => {
                    on.retain(|c| !off.contains(c));
                    let mut flags = on;
                    if !off.is_empty() {
                        flags.push('-');
                        flags.push_str(&off);
                    }
                    if c == ':' {
                        self.open_group(format!("(?{flags}:"), s)?;
                    } else if !flags.is_empty() {
                        self.frame().concat.push(Piece {
                            text: format!("(?{flags})"),
                            kind: PieceKind::Flags,
                            weight: 1,
                        });
                    }
                    return Ok(());
                }
                _ => break,
            }
        }
        Err(syntax(Code::InvalidPerlOp, &s[..s.len() - self.t.len()]))
    }

    /// A backslash outside a class.
    fn escape(&mut self) -> Result<(), Error> {
        let s = self.t;
        let next = s[1..].chars().next();
        let assertion = match next {
            Some('A') => Some(r"\A"),
            Some('z') => Some(r"\z"),
            Some('b') => Some(r"(?-u:\b)"),
            Some('B') => Some(r"(?-u:\B)"),
            Some('C') => return Err(syntax(Code::InvalidEscape, &s[..2])),
            Some('Q') => {
                self.bump(2);
                let (lit, rest) = match self.t.find(r"\E") {
                    Some(end) => (&self.t[..end], &self.t[end + 2..]),
                    None => (self.t, ""),
                };
                self.t = rest;
                for c in lit.chars() {
                    self.literal(c);
                }
                return Ok(());
            }
            _ => None,
        };
        if let Some(text) = assertion {
            self.bump(2);
            self.atom(text.into());
            return Ok(());
        }
        let mut text = String::new();
        if let Some(rest) = unicode_class(s, &mut text)? {
            self.t = rest;
            self.atom(text);
            return Ok(());
        }
        if let Some(group) = next.and_then(perl_group) {
            self.bump(2);
            push_group(&mut text, group);
            self.atom(text);
            return Ok(());
        }
        let (c, rest) = parse_escape(s)?;
        self.t = rest;
        match char::from_u32(c) {
            Some(c) => self.literal(c),
            None => self.atom(NOTHING.into()),
        }
        Ok(())
    }

    /// A bracketed class, from its `[`, as Go's `parseClass` reads it.
    fn class(&mut self) -> Result<String, Error> {
        let whole = self.t;
        let mut out = String::from("[");
        self.bump(1);
        if self.t.starts_with('^') {
            self.bump(1);
            out.push('^');
        }
        let mut items = 0;
        let mut first = true;
        while first || !self.t.starts_with(']') {
            if self.t.is_empty() {
                return Err(syntax(Code::MissingBracket, whole));
            }
            first = false;
            if self.t.len() > 2 && self.t.starts_with("[:") {
                if let Some(i) = self.t[2..].find(":]") {
                    let name = &self.t[..i + 4];
                    let group =
                        posix_group(name).ok_or_else(|| syntax(Code::InvalidCharRange, name))?;
                    self.bump(name.len());
                    push_group(&mut out, group);
                    items += 1;
                    continue;
                }
            }
            if let Some(rest) = unicode_class(self.t, &mut out)? {
                self.t = rest;
                items += 1;
                continue;
            }
            if let Some(group) = self
                .t
                .strip_prefix('\\')
                .and_then(|r| r.chars().next())
                .and_then(perl_group)
            {
                self.bump(2);
                push_group(&mut out, group);
                items += 1;
                continue;
            }
            let range = self.t;
            let lo = self.class_char(whole)?;
            let mut hi = lo;
            if self.t.len() >= 2 && self.t.starts_with('-') && !self.t[1..].starts_with(']') {
                self.bump(1);
                hi = self.class_char(whole)?;
                if hi < lo {
                    let text = &range[..range.len() - self.t.len()];
                    return Err(syntax(Code::InvalidCharRange, text));
                }
            }
            if push_range(&mut out, lo, hi) {
                items += 1;
            }
        }
        self.bump(1);
        if items == 0 {
            out.push_str(NOTHING);
        }
        out.push(']');
        Ok(out)
    }

    fn class_char(&mut self, whole: &str) -> Result<u32, Error> {
        if self.t.starts_with('\\') {
            let (c, rest) = parse_escape(self.t)?;
            self.t = rest;
            return Ok(c);
        }
        let c = self
            .t
            .chars()
            .next()
            .ok_or_else(|| syntax(Code::MissingBracket, whole))?;
        self.bump(c.len_utf8());
        Ok(c as u32)
    }
}

/// `{min}`, `{min,}` or `{min,max}` at the start of `s`, as Go's `parseRepeat` reads it:
/// (min, max, length), `max` `None` for `{min,}`. `None` when it is not a repetition (then `{`
/// is a literal).
fn parse_repeat(s: &str) -> Option<(u64, Option<u64>, usize)> {
    let rest = s.strip_prefix('{')?;
    let (min, rest) = parse_int(rest)?;
    let (max, rest) = match rest.strip_prefix(',') {
        None => (Some(min), rest),
        Some(r) if r.starts_with('}') => (None, r),
        Some(r) => {
            let (max, r) = parse_int(r)?;
            (Some(max), r)
        }
    };
    let rest = rest.strip_prefix('}')?;
    Some((min, max, s.len() - rest.len()))
}

/// A decimal count without leading zeros (saturating: any count too big is refused anyway).
fn parse_int(s: &str) -> Option<(u64, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || (digits >= 2 && s.starts_with('0')) {
        return None;
    }
    Some((s[..digits].parse().unwrap_or(u64::MAX), &s[digits..]))
}

/// Go's `parseEscape`: the code point of a single-character escape at the start of `s` (a
/// backslash and more), and the rest. Code points may be surrogates, as in Go.
fn parse_escape(s: &str) -> Result<(u32, &str), Error> {
    let t = &s[1..];
    let Some(c) = t.chars().next() else {
        return Err(syntax(Code::TrailingBackslash, ""));
    };
    let mut t = &t[c.len_utf8()..];
    let invalid = |t: &str| syntax(Code::InvalidEscape, &s[..s.len() - t.len()]);
    match c {
        c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok((c as u32, t)),
        '0'..='7' => {
            // A single non-zero digit would be a backreference, which RE2 does not have.
            if c != '0' && !t.starts_with(|d: char| ('0'..='7').contains(&d)) {
                return Err(invalid(t));
            }
            let mut r = c as u32 - '0' as u32;
            for _ in 1..3 {
                match t.bytes().next() {
                    Some(d @ b'0'..=b'7') => {
                        r = r * 8 + u32::from(d - b'0');
                        t = &t[1..];
                    }
                    _ => break,
                }
            }
            Ok((r, t))
        }
        'x' => {
            if let Some(rest) = t.strip_prefix('{') {
                let Some(end) = rest.find('}') else {
                    return Err(invalid(""));
                };
                let digits = &rest[..end];
                let after = &rest[end + 1..];
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(after));
                }
                // Go stops at the first digit that takes the value past U+10FFFF.
                let r = digits
                    .chars()
                    .try_fold(0u32, |r, d| {
                        let r = r * 16 + d.to_digit(16)?;
                        (r <= 0x10FFFF).then_some(r)
                    })
                    .ok_or_else(|| invalid(after))?;
                return Ok((r, after));
            }
            let mut hex = t.chars();
            let (Some(x), Some(y)) = (hex.next(), hex.next()) else {
                return Err(invalid(""));
            };
            let after = hex.as_str();
            match (x.to_digit(16), y.to_digit(16)) {
                (Some(x), Some(y)) => Ok((x * 16 + y, after)),
                _ => Err(invalid(after)),
            }
        }
        'a' => Ok((0x07, t)),
        'f' => Ok((0x0c, t)),
        'n' => Ok((u32::from(b'\n'), t)),
        'r' => Ok((u32::from(b'\r'), t)),
        't' => Ok((u32::from(b'\t'), t)),
        'v' => Ok((0x0b, t)),
        _ => Err(invalid(t)),
    }
}

/// Go's `parseUnicodeClass`: if `s` starts with `\p` or `\P`, write the class (in the crate's
/// syntax) to `out` and return the rest.
fn unicode_class<'s>(s: &'s str, out: &mut String) -> Result<Option<&'s str>, Error> {
    let mut negated = match s.get(..2) {
        Some(r"\p") => false,
        Some(r"\P") => true,
        _ => return Ok(None),
    };
    let t = &s[2..];
    let (seq, mut name, rest) = match t.chars().next() {
        Some('{') => {
            let Some(end) = s.find('}') else {
                return Err(syntax(Code::InvalidCharRange, s));
            };
            (&s[..=end], &s[3..end], &s[end + 1..])
        }
        Some(c) => {
            let n = 2 + c.len_utf8();
            (&s[..n], &s[2..n], &s[n..])
        }
        None => (s, "", ""),
    };
    if let Some(bare) = name.strip_prefix('^') {
        negated = !negated;
        name = bare;
    }
    let property = class_property(name).ok_or_else(|| syntax(Code::InvalidCharRange, seq))?;
    let _ = write!(
        out,
        r"\{}{{{property}={name}}}",
        if negated { 'P' } else { 'p' }
    );
    Ok(Some(rest))
}

/// Which property Go looks `name` up in: a general category (or `Any`, `Assigned`, `ASCII`)
/// or a script. The crate alone would also try binary properties, and first.
fn class_property(name: &str) -> Option<&'static str> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ' '))
        // The crate ignores an `Is` prefix (`\p{IsGreek}`); Go does not, and no name Go
        // knows starts with it.
        || name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("is"))
    {
        return None;
    }
    let resolves = |property: &str| {
        regex_syntax::Parser::new()
            .parse(&format!(r"\p{{{property}={name}}}"))
            .is_ok()
    };
    ["gc", "sc"].into_iter().find(|p| resolves(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(re: &str, text: &str) -> bool {
        Regex::new(re)
            .unwrap_or_else(|e| panic!("{re}: {e}"))
            .is_match(text)
    }

    fn refused(re: &str) -> Error {
        match Regex::new(re) {
            Ok(_) => panic!(
                "{re:?} should not compile (translated: {:?})",
                translate(re)
            ),
            Err(e) => e,
        }
    }

    #[test]
    fn matches_like_go_match_string() {
        // Unanchored unless anchored.
        assert!(m("abc", "xxabcxx"));
        assert!(!m("^abc", "xxabc"));
        assert!(m("^abc$", "abc"));
        assert!(!m("^abc$", "abc\n"), "$ is end of text without (?m)");
        assert!(m("(?m)^b$", "a\nb\nc"));
        assert!(m("a.c", "abc") && !m("a.c", "a\nc") && m("(?s)a.c", "a\nc"));
        assert!(m("^a(b|cd)*e$", "abcdbe") && !m("^a(b|cd)*e$", "abcde_"));
        assert!(m("^x+y?z{2,3}$", "xxzz") && !m("^x+y?z{2,3}$", "xzzzz"));
        assert!(m("^a{3}$", "aaa") && !m("^a{3}$", "aa") && m("^a{2,}$", "aaaa"));
        assert!(m("^[a-c]+[^a-c]$", "abcz") && !m("^[a-c]+[^a-c]$", "abca"));
        assert!(m(r"^\d+\.\d+$", "1.25") && !m(r"^\d+\.\d+$", "1x25"));
        assert!(m(r"^\w+\s\W$", "ab_1 !"));
        assert!(m(r"[[:upper:]][[:^alpha:]]", "A1") && !m("[[:upper:]][[:^alpha:]]", "Ab"));
        assert!(m(r"\bfoo\b", "a foo b") && !m(r"\bfoo\b", "afoob") && m(r"\Bo\B", "foo_"));
        assert!(m("(?i)SHA256:AB", "sha256:ab") && !m("SHA256", "sha256"));
        assert!(m("(?i:a)B", "AB") && !m("(?i:a)B", "Ab"));
        assert!(m(r"^\x41\x{263a}\101\t$", "A\u{263a}A\t"));
        assert!(m(r"\Q.*\E", "a.*b") && !m(r"\Q.*\E", "ab"));
        assert!(m("[]a]", "]") && m("[-a]", "-") && m(r"[\d-]", "-"));
        assert!(
            m("^[[:]]$", ":]") && !m("^[[:]]$", "]"),
            "not a POSIX class"
        );
        assert!(m("(?P<n>ab)(?:c)", "abc") && m("x*", "") && m("", "anything"));
        assert!(m("a|", "b"), "an empty alternative matches");
        assert!(m("a{,2}", "a{,2}"), "not a repetition: literal braces");
        assert!(m("^(a*)*$", "aaaa") && !m("^(a*)*$", "aab"));
        // No exponential blow-up.
        let long = "a".repeat(5000);
        assert!(!m("^(a|a)*(a|a)*b$", &long));
    }

    #[test]
    fn perl_classes_and_boundaries_are_ascii_as_in_go() {
        // U+0663 ARABIC-INDIC DIGIT THREE is a Unicode digit, not a Go `\d`.
        assert!(!m(r"\d", "\u{663}") && m(r"^\D$", "\u{663}") && m(r"\d", "x3"));
        assert!(!m(r"[\d]", "\u{663}") && m(r"^[^\d]$", "\u{663}"));
        assert!(!m(r"\w", "é") && m(r"^\W$", "é") && !m("[[:alpha:]]", "é"));
        assert!(
            !m(r"\s", "\u{a0}") && !m(r"\s", "\x0b"),
            "Go's \\s has no \\v"
        );
        assert!(m(r"^\s+$", "\t\n\x0c\r ") && m("[[:space:]]", "\x0b"));
        // `\b` sees é as a non-word character: a boundary between it and a letter.
        assert!(m(r"\bx", "éx") && m(r"é\b", "éx") && !m(r"\Bx", "éx"));
        assert!(!m(r"a\Bé", "aé") && m(r"a\bé", "aé"));
        assert!(
            m(r"^é\Bé$", "éé"),
            "no boundary between two non-word characters"
        );
        assert!(!m(r"\B", "aéa"), "\\B holds only at character boundaries");
        // Escaped punctuation is a literal in Go (the crate reads `\<` as a word start).
        assert!(m(r"\<a\>", "<a>") && !m(r"\<a\>", "a"));
        assert!(m(r"[\d-z]", "-") && m(r"[\d-z]", "z") && !m(r"[\d-z]", "y"));
        assert!(m("[a&&b]", "&") && m("^[--/]$", ".") && m("[a~~b]", "~"));
    }

    #[test]
    fn unicode_classes_name_categories_and_scripts() {
        assert!(m(r"^\pL+$", "héllo") && !m(r"\pL", "123"));
        assert!(m(r"^\p{Greek}+$", "αβγ") && !m(r"\p{Greek}", "abc"));
        assert!(m(r"^\PL$", "1") && !m(r"\PL", "é") && m(r"^\p{^Greek}$", "a"));
        assert!(m(r"^\p{Lu}\p{Ll}$", "Éa") && m(r"^[\p{Nd}x]+$", "x\u{663}"));
        assert!(m(r"^[^\pL]$", "1") && m(r"\p{Any}", "\u{10ffff}"));
        // Script, not Script_Extensions: U+3001 is Common, with Han among its extensions.
        assert!(!m(r"\p{Han}", "\u{3001}") && m(r"\p{Han}", "中"));
        // Go knows categories and scripts, not binary properties.
        for bad in [
            r"\p{Alphabetic}",
            r"\p{Nope}",
            r"\pX",
            r"\p{sc=Greek}",
            r"\p{IsGreek}",
            r"\p{L",
            r"\p",
        ] {
            assert!(
                matches!(
                    refused(bad),
                    Error::Syntax {
                        code: Code::InvalidCharRange,
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn quoting_and_odd_literals() {
        assert!(m(r"^\Q[a]+\E$", "[a]+") && !m(r"\Q[a]+\E", "aa"));
        assert!(
            m(r"^\Qa.b", "a.b") && !m(r"^\Qa.b", "axb"),
            "\\Q runs to the end"
        );
        assert!(
            m(r"^\Qab\E*$", "abbb") && !m(r"^\Qab\E*$", "abab"),
            "* repeats the last"
        );
        assert!(m(r"^\Q\E$", "") && m(r"^a\Q\E*$", "aaa"));
        assert!(
            m("^a{01}$", "a{01}"),
            "no leading zeros: a literal, as in Go"
        );
        assert!(m("^a{1,2$", "a{1,2") && m("^}$", "}") && m("^a{}$", "a{}"));
        assert!(m(r"^\x{0}\0$", "\0\0") && m(r"^\777$", "\u{1ff}"));
        assert!(!m(r"\x{D800}", "\u{fffd}") && m(r"^[^\x{D800}]$", "x"));
        assert!(m(r"^[\x{D000}-\x{E000}]$", "\u{e000}"));
        assert!(m(r"^#\ \-$", "# -"));
    }

    #[test]
    fn flags_as_go_reads_them() {
        assert!(
            m("(?i)k", "\u{212a}"),
            "simple case folding: the Kelvin sign"
        );
        assert!(m(r"(?i)\w", "\u{212a}") && !m(r"(?i)\W", "\u{212a}"));
        assert!(m("(?i)[[:upper:]]", "a") && m(r"(?i)\p{Lu}", "a"));
        assert!(m("(?i)σ", "ς") && m("(?i)Σ", "σ"));
        assert!(m("^(?i)a(?-i)b$", "Ab") && !m("^(?i)a(?-i)b$", "AB"));
        assert!(
            m("^(?i-i)a$", "a") && !m("^(?i-i)a$", "A"),
            "last mention wins"
        );
        assert!(m("^(?ii)a$", "A"));
        assert!(m("^(?)a$", "a"), "an empty flag group");
        assert!(
            m("^a(?i)*$", "aaa"),
            "a flag change is no operand: * repeats a"
        );
        assert!(m("^a*(?i)?$", "aa"));
        assert!(m("(?U)^a+$", "aaa") && m("^a+?$", "aaa"));
        assert!(m("(?sm)^.$", "\n"));
    }

    #[test]
    fn repeat_counts_are_bounded_as_in_re2() {
        assert!(m("^a{1000}$", &"a".repeat(1000)));
        assert!(m("^(?:a{10}){100}$", &"a".repeat(1000)));
        assert!(m("^(?:a{1000}){0,1}$", ""), "a count of one is not checked");
        assert!(m("^(?:(?:a{1000}){0})$", ""));
        for bad in [
            "a{1001}",
            "a{0,1001}",
            "a{1001,}",
            "a{2,1}",
            "a{100000000}",
            "(a{2}){501}",
            "((a{10}){10}){11}",
            "(a{2}|b{1000}){2}",
        ] {
            let e = refused(bad);
            assert!(
                matches!(
                    e,
                    Error::Syntax {
                        code: Code::InvalidRepeatSize,
                        ..
                    }
                ),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("invalid repeat count"), "{e}");
        }
    }

    #[test]
    fn invalid_expressions_are_refused() {
        for (re, code) in [
            ("(", Code::MissingParen),
            ("(a|b", Code::MissingParen),
            ("a)", Code::UnexpectedParen),
            ("[a", Code::MissingBracket),
            ("[]", Code::MissingBracket),
            ("*a", Code::MissingRepeatArgument),
            ("(*)", Code::MissingRepeatArgument),
            ("a|*", Code::MissingRepeatArgument),
            ("(?i)*", Code::MissingRepeatArgument),
            ("a**", Code::InvalidRepeatOp),
            ("a*+", Code::InvalidRepeatOp),
            ("a*??", Code::InvalidRepeatOp),
            ("a{2}{3}", Code::InvalidRepeatOp),
            ("x{3,2}", Code::InvalidRepeatSize),
            (r"\1", Code::InvalidEscape),
            (r"\8", Code::InvalidEscape),
            (r"\C", Code::InvalidEscape),
            (r"\é", Code::InvalidEscape),
            (r"\x{110000}", Code::InvalidEscape),
            (r"\xZ1", Code::InvalidEscape),
            (r"[\b]", Code::InvalidEscape),
            (r"[a-\d]", Code::InvalidEscape),
            ("(?z)", Code::InvalidPerlOp),
            ("(?-)", Code::InvalidPerlOp),
            ("(?i-)", Code::InvalidPerlOp),
            ("(?x)", Code::InvalidPerlOp),
            ("(?=a)", Code::InvalidPerlOp),
            ("(?P=n)", Code::InvalidPerlOp),
            ("(?P<n", Code::InvalidNamedCapture),
            ("(?P<a-b>x)", Code::InvalidNamedCapture),
            ("(?<>x)", Code::InvalidNamedCapture),
            ("[z-a]", Code::InvalidCharRange),
            ("[[:nope:]]", Code::InvalidCharRange),
            (r"a\", Code::TrailingBackslash),
        ] {
            match Regex::new(re) {
                Err(Error::Syntax { code: got, .. }) => assert_eq!(got, code, "{re:?}"),
                other => panic!("{re:?} should be refused with {code}, got {other:?}"),
            }
        }
        assert!(
            m("(?P<1st>a)(?P<1st>b)", "ab"),
            "Go allows these names, twice"
        );
    }

    #[test]
    fn client_expressions_are_bounded() {
        assert!(matches!(refused(r"\pL{1000}"), Error::TooLarge { .. }));
        let deep = format!("{}a{}", "(".repeat(300), ")".repeat(300));
        assert!(matches!(refused(&deep), Error::Unsupported { .. }));
        assert!(m(&format!("{}a{}", "(".repeat(100), ")".repeat(100)), "a"));
    }
}

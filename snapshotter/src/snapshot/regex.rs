//! Regular expressions for the `~=` filter operator. containerd compiles the value with Go's
//! `regexp` (RE2 syntax, Perl flags) and asks `MatchString`: does the expression match anywhere
//! in the field. This is that, for the syntax filters use, without a dependency (the crate has
//! none for regexes): a parser to an expression tree, a compiler to a small program, and a Pike
//! VM that runs it in time linear in the text, so no filter can make List hang.
//!
//! Supported: literals, `.`, classes (`[a-z]`, `[^...]`, `[[:alpha:]]`, `\d \s \w` and their
//! negations), anchors (`^ $ \A \z \b \B`), groups (`(...)`, `(?:...)`, `(?P<n>...)`,
//! `(?<n>...)`), flags (`(?i)`, `(?m)`, `(?s)`, `(?U)`, scoped `(?i:...)`), alternation,
//! repetition (`* + ? {n} {n,} {n,m}`, lazy forms), escapes (`\t \n \x41 \x{263a} \101 \Q..\E`
//! and escaped punctuation). Unicode classes (`\pL`) are refused as a compile error, which
//! containerd's filter treats like any invalid expression: the selector matches nothing.

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct Regex {
    prog: Vec<Inst>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    StartText,
    EndText,
    StartLine,
    EndLine,
    WordBoundary,
    NotWordBoundary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Class {
    ranges: Vec<(char, char)>,
    negated: bool,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= c && c <= b) != self.negated
    }
}

#[derive(Debug, Clone)]
enum Inst {
    Char(char),
    Class(Class),
    Any,
    AnyNotNl,
    Look(Look),
    Split(usize, usize),
    Jmp(usize),
    Match,
}

#[derive(Debug, Clone)]
enum Node {
    Empty,
    Char(char),
    Class(Class),
    Any {
        nl: bool,
    },
    Look(Look),
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    fold: bool,
    multi_line: bool,
    dot_nl: bool,
}

/// RE2's limit on one repetition count.
const MAX_REPEAT: u32 = 1000;
/// Bound on the compiled program, so that nested repetitions cannot exhaust memory.
const MAX_PROG: usize = 100_000;

impl Regex {
    /// Compile `re`; the error says what is wrong with it.
    pub fn new(re: &str) -> Result<Regex, String> {
        let mut p = Parser {
            chars: re.chars().collect(),
            pos: 0,
        };
        let mut flags = Flags::default();
        let node = p.alternation(&mut flags)?;
        if p.pos < p.chars.len() {
            // Only an unmatched `)` stops the top level early.
            return Err(format!("unexpected ): {re}"));
        }
        let mut prog = Vec::new();
        compile(&node, &mut prog)?;
        prog.push(Inst::Match);
        Ok(Regex { prog })
    }

    /// Whether the expression matches anywhere in `text` (Go's `MatchString`).
    pub fn is_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let mut cur = Threads::new(self.prog.len());
        let mut next = Threads::new(self.prog.len());
        let mut prev: Option<char> = None;
        for i in 0..=chars.len() {
            let here = chars.get(i).copied();
            // Unanchored search: a new thread starts at every position.
            self.add(&mut cur, 0, prev, here);
            if cur.matched {
                return true;
            }
            let Some(c) = here else { break };
            let after = chars.get(i + 1).copied();
            next.clear();
            for k in 0..cur.dense.len() {
                let pc = cur.dense[k];
                let step = match &self.prog[pc] {
                    Inst::Char(x) => *x == c,
                    Inst::Class(cl) => cl.matches(c),
                    Inst::Any => true,
                    Inst::AnyNotNl => c != '\n',
                    _ => false,
                };
                if step {
                    self.add(&mut next, pc + 1, Some(c), after);
                }
            }
            std::mem::swap(&mut cur, &mut next);
            prev = Some(c);
        }
        false
    }

    /// Add the thread at `pc` and everything reachable from it without consuming a character,
    /// between `prev` and `here`.
    fn add(&self, list: &mut Threads, pc: usize, prev: Option<char>, here: Option<char>) {
        let mut stack = vec![pc];
        while let Some(pc) = stack.pop() {
            if !list.insert(pc) {
                continue;
            }
            match &self.prog[pc] {
                Inst::Jmp(t) => stack.push(*t),
                Inst::Split(a, b) => {
                    stack.push(*b);
                    stack.push(*a);
                }
                Inst::Look(l) if look_holds(*l, prev, here) => stack.push(pc + 1),
                Inst::Match => list.matched = true,
                _ => {}
            }
        }
    }
}

fn is_word(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn look_holds(l: Look, prev: Option<char>, here: Option<char>) -> bool {
    match l {
        Look::StartText => prev.is_none(),
        Look::EndText => here.is_none(),
        Look::StartLine => prev.is_none() || prev == Some('\n'),
        Look::EndLine => here.is_none() || here == Some('\n'),
        Look::WordBoundary => is_word(prev) != is_word(here),
        Look::NotWordBoundary => is_word(prev) == is_word(here),
    }
}

/// A sparse set of program counters (the threads at one position).
struct Threads {
    dense: Vec<usize>,
    sparse: Vec<usize>,
    matched: bool,
}

impl Threads {
    fn new(n: usize) -> Self {
        Threads {
            dense: Vec::with_capacity(n),
            sparse: vec![0; n],
            matched: false,
        }
    }

    fn insert(&mut self, pc: usize) -> bool {
        let i = self.sparse[pc];
        if i < self.dense.len() && self.dense[i] == pc {
            return false;
        }
        self.sparse[pc] = self.dense.len();
        self.dense.push(pc);
        true
    }

    fn clear(&mut self) {
        self.dense.clear();
        self.matched = false;
    }
}

fn compile(node: &Node, prog: &mut Vec<Inst>) -> Result<(), String> {
    if prog.len() > MAX_PROG {
        return Err("expression too large".into());
    }
    match node {
        Node::Empty => {}
        Node::Char(c) => prog.push(Inst::Char(*c)),
        Node::Class(c) => prog.push(Inst::Class(c.clone())),
        Node::Any { nl: true } => prog.push(Inst::Any),
        Node::Any { nl: false } => prog.push(Inst::AnyNotNl),
        Node::Look(l) => prog.push(Inst::Look(*l)),
        Node::Concat(v) => {
            for n in v {
                compile(n, prog)?;
            }
        }
        Node::Alt(v) => {
            let mut exits = Vec::new();
            for (i, n) in v.iter().enumerate() {
                if i + 1 == v.len() {
                    compile(n, prog)?;
                } else {
                    let split = prog.len();
                    prog.push(Inst::Split(0, 0));
                    compile(n, prog)?;
                    exits.push(prog.len());
                    prog.push(Inst::Jmp(0));
                    prog[split] = Inst::Split(split + 1, prog.len());
                }
            }
            let end = prog.len();
            for e in exits {
                prog[e] = Inst::Jmp(end);
            }
        }
        Node::Repeat { node, min, max } => {
            for _ in 0..*min {
                compile(node, prog)?;
            }
            match max {
                None => {
                    let split = prog.len();
                    prog.push(Inst::Split(0, 0));
                    compile(node, prog)?;
                    prog.push(Inst::Jmp(split));
                    prog[split] = Inst::Split(split + 1, prog.len());
                }
                Some(max) => {
                    let mut splits = Vec::new();
                    for _ in *min..*max {
                        splits.push(prog.len());
                        prog.push(Inst::Split(0, 0));
                        compile(node, prog)?;
                    }
                    let end = prog.len();
                    for s in splits {
                        prog[s] = Inst::Split(s + 1, end);
                    }
                }
            }
        }
    }
    Ok(())
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

/// Result of parsing one atom.
enum Atom {
    Node(Node),
    /// A flag group like `(?i)`: changes flags, cannot be repeated.
    Flags,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn alternation(&mut self, flags: &mut Flags) -> Result<Node, String> {
        let mut alts = vec![self.concat(flags)?];
        while self.eat('|') {
            alts.push(self.concat(flags)?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().unwrap_or(Node::Empty)
        } else {
            Node::Alt(alts)
        })
    }

    fn concat(&mut self, flags: &mut Flags) -> Result<Node, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom(flags)?;
            let node = match atom {
                Atom::Flags => {
                    if self.repeat_follows() {
                        return Err("missing argument to repetition operator".into());
                    }
                    continue;
                }
                Atom::Node(n) => n,
            };
            items.push(self.repetitions(node)?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Node::Empty)
        } else {
            Node::Concat(items)
        })
    }

    /// Whether a repetition operator starts at the current position.
    fn repeat_follows(&self) -> bool {
        match self.peek() {
            Some('*' | '+' | '?') => true,
            Some('{') => self.braces_at(self.pos).is_some(),
            _ => false,
        }
    }

    /// `{n}`, `{n,}` or `{n,m}` at `at`: (min, max, length).
    fn braces_at(&self, at: usize) -> Option<(u32, Option<u32>, usize)> {
        let mut i = at;
        if self.chars.get(i) != Some(&'{') {
            return None;
        }
        i += 1;
        let num = |i: &mut usize| -> Option<u32> {
            let start = *i;
            while self.chars.get(*i).is_some_and(|c| c.is_ascii_digit()) {
                *i += 1;
            }
            if *i == start {
                return None;
            }
            let s: String = self.chars[start..*i].iter().collect();
            // Over-long numbers are out of range; the caller reports it.
            Some(s.parse::<u32>().unwrap_or(u32::MAX))
        };
        let min = num(&mut i)?;
        let max = if self.chars.get(i) == Some(&',') {
            i += 1;
            if self.chars.get(i) == Some(&'}') {
                None
            } else {
                Some(num(&mut i)?)
            }
        } else {
            Some(min)
        };
        if self.chars.get(i) != Some(&'}') {
            return None;
        }
        Some((min, max, i + 1 - at))
    }

    fn repetitions(&mut self, node: Node) -> Result<Node, String> {
        let (min, max) = match self.peek() {
            Some('*') => {
                self.pos += 1;
                (0, None)
            }
            Some('+') => {
                self.pos += 1;
                (1, None)
            }
            Some('?') => {
                self.pos += 1;
                (0, Some(1))
            }
            Some('{') => match self.braces_at(self.pos) {
                Some((min, max, len)) => {
                    self.pos += len;
                    if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT || m < min) {
                        return Err("invalid repeat count".into());
                    }
                    (min, max)
                }
                None => return Ok(node),
            },
            _ => return Ok(node),
        };
        // Lazy forms match the same texts.
        self.eat('?');
        if self.repeat_follows() {
            return Err("invalid nested repetition operator".into());
        }
        Ok(Node::Repeat {
            node: Box::new(node),
            min,
            max,
        })
    }

    fn atom(&mut self, flags: &mut Flags) -> Result<Atom, String> {
        let Some(c) = self.peek() else {
            return Ok(Atom::Node(Node::Empty));
        };
        self.pos += 1;
        let node = match c {
            '(' => return self.group(flags),
            '[' => Node::Class(self.class(*flags)?),
            '.' => Node::Any { nl: flags.dot_nl },
            '^' => Node::Look(if flags.multi_line {
                Look::StartLine
            } else {
                Look::StartText
            }),
            '$' => Node::Look(if flags.multi_line {
                Look::EndLine
            } else {
                Look::EndText
            }),
            '*' | '+' | '?' => return Err("missing argument to repetition operator".into()),
            '{' if self.braces_at(self.pos - 1).is_some() => {
                return Err("missing argument to repetition operator".into())
            }
            '\\' => self.escape(*flags)?,
            c => literal(c, *flags),
        };
        Ok(Atom::Node(node))
    }

    fn group(&mut self, flags: &mut Flags) -> Result<Atom, String> {
        let mut inner = *flags;
        if self.eat('?') {
            match self.peek() {
                Some('P') if self.peek_at(1) == Some('<') => {
                    self.pos += 2;
                    self.group_name()?;
                }
                Some('<') => {
                    self.pos += 1;
                    self.group_name()?;
                }
                _ => {
                    // Flags: `(?flags)` or `(?flags:re)`.
                    let mut negate = false;
                    let mut any = false;
                    loop {
                        let Some(c) = self.peek() else {
                            return Err("missing closing )".into());
                        };
                        self.pos += 1;
                        match c {
                            'i' => inner.fold = !negate,
                            'm' => inner.multi_line = !negate,
                            's' => inner.dot_nl = !negate,
                            'U' => {}
                            '-' if !negate => {
                                negate = true;
                                any = false;
                                continue;
                            }
                            ')' if any || !negate => {
                                if !any && !negate {
                                    return Err("missing argument to flag group".into());
                                }
                                *flags = inner;
                                return Ok(Atom::Flags);
                            }
                            ':' if any || !negate => break,
                            _ => return Err("invalid or unsupported Perl syntax".into()),
                        }
                        any = true;
                    }
                }
            }
        }
        let node = self.alternation(&mut inner)?;
        if !self.eat(')') {
            return Err("missing closing )".into());
        }
        Ok(Atom::Node(node))
    }

    fn group_name(&mut self) -> Result<(), String> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        if self.pos == start || !self.eat('>') {
            return Err("invalid named capture".into());
        }
        Ok(())
    }

    /// After a backslash outside a class.
    fn escape(&mut self, flags: Flags) -> Result<Node, String> {
        let Some(c) = self.peek() else {
            return Err("trailing backslash at end of expression".into());
        };
        match c {
            'A' => {
                self.pos += 1;
                Ok(Node::Look(Look::StartText))
            }
            'z' => {
                self.pos += 1;
                Ok(Node::Look(Look::EndText))
            }
            'b' => {
                self.pos += 1;
                Ok(Node::Look(Look::WordBoundary))
            }
            'B' => {
                self.pos += 1;
                Ok(Node::Look(Look::NotWordBoundary))
            }
            'Q' => {
                self.pos += 1;
                let mut lits = Vec::new();
                while let Some(c) = self.peek() {
                    if c == '\\' && self.peek_at(1) == Some('E') {
                        self.pos += 2;
                        break;
                    }
                    self.pos += 1;
                    lits.push(literal(c, flags));
                }
                Ok(Node::Concat(lits))
            }
            _ => match self.class_escape()? {
                Escaped::Char(c) => Ok(literal(c, flags)),
                Escaped::Class(cl) => Ok(Node::Class(fold_class(cl, flags))),
            },
        }
    }

    /// An escape that stands for a character or a class (inside or outside brackets); the
    /// backslash is consumed already.
    fn class_escape(&mut self) -> Result<Escaped, String> {
        let Some(c) = self.peek() else {
            return Err("trailing backslash at end of expression".into());
        };
        self.pos += 1;
        let perl = |ranges: &[(char, char)], negated: bool| {
            Ok(Escaped::Class(Class {
                ranges: ranges.to_vec(),
                negated,
            }))
        };
        match c {
            'd' => perl(DIGIT, false),
            'D' => perl(DIGIT, true),
            's' => perl(SPACE, false),
            'S' => perl(SPACE, true),
            'w' => perl(WORD, false),
            'W' => perl(WORD, true),
            'a' => Ok(Escaped::Char('\x07')),
            'f' => Ok(Escaped::Char('\x0c')),
            't' => Ok(Escaped::Char('\t')),
            'n' => Ok(Escaped::Char('\n')),
            'r' => Ok(Escaped::Char('\r')),
            'v' => Ok(Escaped::Char('\x0b')),
            'x' => {
                let digits: String = if self.eat('{') {
                    let start = self.pos;
                    while self.peek().is_some_and(|c| c != '}') {
                        self.pos += 1;
                    }
                    let s: String = self.chars[start..self.pos].iter().collect();
                    if !self.eat('}') || s.is_empty() {
                        return Err("invalid escape sequence".into());
                    }
                    s
                } else {
                    let s: String = self.chars.iter().skip(self.pos).take(2).collect();
                    self.pos += s.chars().count();
                    if s.chars().count() != 2 {
                        return Err("invalid escape sequence".into());
                    }
                    s
                };
                u32::from_str_radix(&digits, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .map(Escaped::Char)
                    .ok_or_else(|| "invalid escape sequence".to_string())
            }
            '0'..='7' => {
                // Octal: `\0`, `\0nn`, or `\nnn` with at least two digits (a single non-zero
                // digit would be a backreference, which RE2 does not have).
                if c != '0' && !self.peek().is_some_and(|d| ('0'..='7').contains(&d)) {
                    return Err("invalid escape sequence".into());
                }
                let mut v = c as u32 - '0' as u32;
                for _ in 0..2 {
                    match self.peek() {
                        Some(d @ '0'..='7') => {
                            v = v * 8 + (d as u32 - '0' as u32);
                            self.pos += 1;
                        }
                        _ => break,
                    }
                }
                char::from_u32(v)
                    .map(Escaped::Char)
                    .ok_or_else(|| "invalid escape sequence".to_string())
            }
            c if c.is_ascii_punctuation() => Ok(Escaped::Char(c)),
            _ => Err(format!("invalid escape sequence \\{c}")),
        }
    }

    /// After `[`.
    fn class(&mut self, flags: Flags) -> Result<Class, String> {
        let negated = self.eat('^');
        let mut ranges: Vec<(char, char)> = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return Err("missing closing ]".into());
            };
            if c == ']' && !first {
                self.pos += 1;
                break;
            }
            first = false;
            if c == '[' && self.peek_at(1) == Some(':') {
                if let Some((set, neg, len)) = self.posix_class() {
                    self.pos += len;
                    if neg {
                        ranges.extend(complement(set));
                    } else {
                        ranges.extend_from_slice(set);
                    }
                    continue;
                }
            }
            let lo = self.class_char()?;
            let lo = match lo {
                Escaped::Class(cl) => {
                    if cl.negated {
                        ranges.extend(complement(&cl.ranges));
                    } else {
                        ranges.extend(cl.ranges);
                    }
                    continue;
                }
                Escaped::Char(c) => c,
            };
            if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                self.pos += 1;
                let hi = match self.class_char()? {
                    Escaped::Char(c) => c,
                    Escaped::Class(_) => return Err("invalid character class range".into()),
                };
                if hi < lo {
                    return Err("invalid character class range".into());
                }
                ranges.push((lo, hi));
            } else {
                ranges.push((lo, lo));
            }
        }
        Ok(fold_class(Class { ranges, negated }, flags))
    }

    fn class_char(&mut self) -> Result<Escaped, String> {
        let Some(c) = self.peek() else {
            return Err("missing closing ]".into());
        };
        self.pos += 1;
        if c == '\\' {
            self.class_escape()
        } else {
            Ok(Escaped::Char(c))
        }
    }

    /// `[:name:]` or `[:^name:]` at the current position: (ranges, negated, length).
    fn posix_class(&self) -> Option<(Ranges, bool, usize)> {
        let rest: String = self.chars[self.pos..].iter().take(12).collect();
        let end = rest.find(":]").filter(|e| *e >= 2)?;
        let mut name = &rest[2..end];
        let neg = name.starts_with('^');
        if neg {
            name = &name[1..];
        }
        let set: Ranges = match name {
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
        Some((set, neg, end + 2))
    }
}

/// A static set of character ranges.
type Ranges = &'static [(char, char)];

enum Escaped {
    Char(char),
    Class(Class),
}

const DIGIT: &[(char, char)] = &[('0', '9')];
const SPACE: &[(char, char)] = &[('\t', '\n'), ('\x0c', '\r'), (' ', ' ')];
const WORD: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];

fn literal(c: char, flags: Flags) -> Node {
    if flags.fold {
        let cl = fold_class(
            Class {
                ranges: vec![(c, c)],
                negated: false,
            },
            flags,
        );
        if cl.ranges.len() > 1 {
            return Node::Class(cl);
        }
    }
    Node::Char(c)
}

/// Under `(?i)`, add the other cases of every character of the class.
fn fold_class(mut cl: Class, flags: Flags) -> Class {
    if !flags.fold {
        return cl;
    }
    let mut extra = Vec::new();
    for &(a, b) in &cl.ranges {
        if (b as u32).saturating_sub(a as u32) > 0x3000 {
            continue;
        }
        for c in (a as u32..=b as u32).filter_map(char::from_u32) {
            for other in c.to_lowercase().chain(c.to_uppercase()) {
                if other != c {
                    extra.push((other, other));
                }
            }
        }
    }
    cl.ranges.extend(extra);
    cl
}

fn next_char(c: char) -> Option<char> {
    match c {
        '\u{d7ff}' => Some('\u{e000}'),
        c => char::from_u32(c as u32 + 1),
    }
}

fn prev_char(c: char) -> Option<char> {
    match c {
        '\u{e000}' => Some('\u{d7ff}'),
        '\0' => None,
        c => char::from_u32(c as u32 - 1),
    }
}

/// The characters not in `ranges`.
fn complement(ranges: &[(char, char)]) -> Vec<(char, char)> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut out = Vec::new();
    let mut lo = Some('\0');
    for (a, b) in sorted {
        if let Some(l) = lo {
            if l < a {
                if let Some(p) = prev_char(a) {
                    out.push((l, p));
                }
            }
        }
        if lo.is_some_and(|l| l <= b) {
            lo = next_char(b);
        }
    }
    if let Some(l) = lo {
        out.push((l, char::MAX));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(re: &str, text: &str) -> bool {
        Regex::new(re)
            .unwrap_or_else(|e| panic!("{re}: {e}"))
            .is_match(text)
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
    fn invalid_expressions_are_refused() {
        for re in [
            "(", "a)", "[a", "*a", "a**", "a{1001}", "x{3,2}", r"\1", r"\pL", "(?z)", "[z-a]",
            r"a\",
        ] {
            assert!(Regex::new(re).is_err(), "{re:?} should not compile");
        }
    }
}

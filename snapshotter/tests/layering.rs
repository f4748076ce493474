//! ARCHITECTURE.md's code map is a contract: each row names a module of `snapshotter/src` and
//! the modules it uses, and a module may use only modules listed above it. This test reads the
//! table and the source and fails when they disagree in either direction (an import the table
//! does not draw, or an arrow the code does not have), or when the table is not in order (which
//! is what rules out cycles).
//!
//! An import is any `crate::NAME` path (including `crate::{a, b::c}` groups) outside comments
//! and outside a file's trailing `#[cfg(test)] mod tests` (tests beside the code may build
//! fixtures with any module).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `(module, uses)` rows of the code map, in table order.
fn table(architecture: &str) -> Vec<(String, BTreeSet<String>)> {
    let section = architecture
        .split("## Code map")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Code map` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = Vec::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        if cells.len() < 3 || cells[0].trim() == "module" || cells[0].contains("---") {
            continue;
        }
        let names = backticked(cells[0]);
        let uses: BTreeSet<String> = backticked(cells[cells.len() - 1])
            .into_iter()
            .map(|n| n.trim_end_matches('/').to_string())
            .collect();
        for n in names {
            let n = n.trim_end_matches('/').to_string();
            if !n.starts_with("bin/") {
                rows.push((n, uses.clone()));
            }
        }
    }
    rows
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_string())
        .collect()
}

/// Source with comments and the trailing test module removed.
fn code_of(path: &Path) -> String {
    let src = std::fs::read_to_string(path).unwrap();
    // `#[cfg(test)]` then `mod tests` (or `pub(super) mod tests`) at the top level.
    let cut = src.match_indices("\n#[cfg(test)]\n").find(|(i, m)| {
        src[i + m.len()..]
            .lines()
            .next()
            .is_some_and(|l| l.ends_with("mod tests {"))
    });
    let src = match cut {
        Some((i, _)) => &src[..i],
        None => &src[..],
    };
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Modules of `crate::` paths in `code`.
fn imports(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let n = ident(part.trim());
                if !n.is_empty() {
                    out.insert(n);
                }
            }
        } else {
            let n = ident(rest);
            if !n.is_empty() {
                out.insert(n);
            }
        }
    }
    // `beam_format` is reached through `crate::format` only.
    out.remove("self");
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Imports per top-level module of `src` (bins and lib.rs excluded).
fn code_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if first == "bin" || rel == Path::new("lib.rs") {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let mut deps = imports(&code_of(&f));
        deps.remove(&module);
        graph.entry(module).or_default().extend(deps);
    }
    graph
}

#[test]
fn the_code_map_draws_exactly_the_imports_and_points_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("../ARCHITECTURE.md")).unwrap();
    let rows = table(&architecture);
    let graph = code_graph(&root.join("src"));
    let mut problems = Vec::new();

    let listed: BTreeSet<&String> = rows.iter().map(|(m, _)| m).collect();
    for m in graph.keys() {
        if !listed.contains(m) {
            problems.push(format!("module `{m}` is not in the code map"));
        }
    }
    let mut above = BTreeSet::new();
    for (m, uses) in &rows {
        let actual = graph.get(m).cloned().unwrap_or_default();
        for d in actual.difference(uses) {
            problems.push(format!(
                "`{m}` uses `{d}`, which the code map does not draw"
            ));
        }
        for d in uses.difference(&actual) {
            problems.push(format!(
                "the code map draws `{m}` → `{d}`, which the code lacks"
            ));
        }
        for d in uses {
            if !above.contains(d) {
                problems.push(format!("`{m}` uses `{d}`, which is not listed above it"));
            }
        }
        above.insert(m.clone());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn imports_are_found_in_paths_and_groups_not_in_comments() {
    let code = code_of_str(
        "use crate::fetch::{A, B};\nuse crate::{cache, oci::X};\n// crate::mount\nlet x = crate::fs::f();",
    );
    let want: BTreeSet<String> = ["fetch", "cache", "oci", "fs"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(imports(&code), want);
}

fn code_of_str(s: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.rs");
    std::fs::write(&p, s).unwrap();
    code_of(&p)
}

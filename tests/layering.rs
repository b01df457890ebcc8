//! DESIGN's layering rule: a module imports only from modules below it, and the nouns several
//! layers share live at the bottom. An import cycle between two source files, or between two
//! top-level modules, breaks it; this test is in the test command so that one cannot land.
//!
//! The imports are read from the text, not from the compiler: `use crate::…` trees, `crate::…`
//! paths anywhere, and `super::`/`self::` paths made absolute from their file, each resolved to
//! the longest prefix that is a source file. Comments and literals are left out, and so are
//! `#[cfg(test)]` items and the files declared by `#[cfg(test)] mod NAME;`: test code may reach
//! anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use regex::Regex;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module a file under src/ is: `a/b.rs` → `a::b`, `a/mod.rs` → `a`, `lib.rs` → "".
fn module_of(rel: &str) -> String {
    let mut parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    if matches!(parts.last(), Some(&("mod" | "lib" | "main"))) {
        parts.pop();
    }
    parts.join("::")
}

/// The code without comments, literals and `#[cfg(test)]` items, and the names of the files
/// it declares under `#[cfg(test)] mod NAME;`.
fn strip(text: &str) -> (String, Vec<String>) {
    // Comments, (raw) strings and chars, matched left to right so `"//"` or `'{'` is a literal.
    let noise = r##"(?s)//[^\n]*|/\*.*?\*/|\bb?r"[^"]*"|\bb?r#+".*?"#+|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)'"##;
    let text = Regex::new(noise).unwrap().replace_all(text, " ");
    let attrs = Regex::new(r"^(?:\s*#\[[^\]]*\])*").unwrap();
    let test_file = Regex::new(r"^(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;$").unwrap();
    let (mut code, mut test_files, mut rest) = (String::new(), Vec::new(), &*text);
    while let Some(at) = rest.find("#[cfg(test)]") {
        code.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let item = &item[attrs.find(item).map_or(0, |m| m.end())..];
        let end = item_end(item);
        if let Some(c) = test_file.captures(item[..end].trim()) {
            test_files.push(c[1].to_string());
        }
        rest = &item[end..];
    }
    (code + rest, test_files)
}

/// Where the item at the start of `s` ends: after its `;` or `,` or its braced body, or before
/// the bracket closing the block around it (a match arm, a field).
fn item_end(s: &str) -> usize {
    let mut depth = 0;
    for (i, b) in s.bytes().enumerate() {
        match b {
            b')' | b']' | b'}' if depth == 0 => return i,
            b'}' if depth == 1 => return i + 1,
            b';' | b',' if depth == 0 => return i + 1,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

/// Every path starting at `crate`, `self` or `super`, with use trees spelled out.
fn paths(code: &str) -> BTreeSet<String> {
    let anywhere = Regex::new(r"\b(?:crate|self|super)(?:::\w+)+").unwrap();
    let uses = Regex::new(r"\buse\s+((?:crate|self|super)::[^;]*);").unwrap();
    let mut found: BTreeSet<String> = anywhere
        .find_iter(code)
        .map(|m| m.as_str().to_string())
        .collect();
    for c in uses.captures_iter(code) {
        expand(&c[1], &mut found);
    }
    found
}

/// `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str, out: &mut BTreeSet<String>) {
    let (mut prefixes, mut item) = (vec![String::new()], String::new());
    for ch in tree.chars().chain([',']) {
        let prefix = prefixes.last().cloned().unwrap_or_default();
        match ch {
            '{' => prefixes.push(prefix + std::mem::take(&mut item).trim()),
            ',' | '}' => {
                if let Some(path) = std::mem::take(&mut item).split_whitespace().next() {
                    out.insert(prefix + path);
                }
                if ch == '}' {
                    prefixes.pop();
                }
            }
            _ => item.push(ch),
        }
    }
}

/// The source file `path`, written in module `from`, leads to: its longest known prefix.
fn resolve(path: &str, from: &str, files: &BTreeSet<String>) -> Option<String> {
    let mut abs: Vec<&str> = match path.split("::").next()? {
        "crate" => vec![],
        "self" | "super" => from.split("::").collect(),
        _ => return None,
    };
    for part in path.split("::") {
        match part.trim() {
            "super" => _ = abs.pop(),
            "crate" | "self" | "*" | "" => {}
            name => abs.push(name),
        }
    }
    (1..=abs.len())
        .rev()
        .map(|k| abs[..k].join("::"))
        .find(|m| files.contains(m))
        .filter(|m| m != from)
}

/// The imports between source files (given as path under src/ and text), and between
/// top-level modules. The crate root is in neither: it declares everything.
fn graphs(sources: &[(String, String)]) -> (Graph, Graph) {
    let (mut code, mut test_only) = (BTreeMap::new(), BTreeSet::new());
    for (rel, text) in sources {
        let module = module_of(rel);
        let (stripped, test_files) = strip(text);
        test_only.extend(test_files.iter().map(|name| format!("{module}::{name}")));
        code.insert(module, stripped);
    }
    code.retain(|m, _| !m.is_empty() && !test_only.iter().any(|t| t.trim_start_matches(':') == m));
    let files: BTreeSet<String> = code.keys().cloned().collect();
    let top = |m: &str| m.split("::").next().unwrap_or_default().to_string();
    let (mut by_file, mut by_module) = (Graph::new(), Graph::new());
    for (from, text) in &code {
        let (targets, modules) = (
            by_file.entry(from.clone()).or_default(),
            by_module.entry(top(from)).or_default(),
        );
        for to in paths(text).iter().filter_map(|p| resolve(p, from, &files)) {
            if top(&to) != top(from) {
                modules.insert(top(&to));
            }
            targets.insert(to);
        }
    }
    (by_file, by_module)
}

/// Tarjan's strongly connected components with more than one member, each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    #[derive(Default)]
    struct Walk<'g> {
        index: BTreeMap<&'g str, (usize, usize)>, // (visit order, lowest order reachable)
        stack: Vec<&'g str>,
        found: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, graph: &'g Graph, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, (n, n));
            self.stack.push(v);
            for w in graph.get(v).into_iter().flatten().map(String::as_str) {
                let low = match self.index.get(w) {
                    None => {
                        self.visit(graph, w);
                        self.index[w].1
                    }
                    Some(&(order, _)) if self.stack.contains(&w) => order,
                    Some(_) => continue,
                };
                let entry = self.index.get_mut(v).unwrap();
                entry.1 = entry.1.min(low);
            }
            if self.index[v].0 == self.index[v].1 {
                let at = self.stack.iter().rposition(|&x| x == v).unwrap();
                let mut scc: Vec<String> = self.stack.drain(at..).map(String::from).collect();
                if scc.len() > 1 {
                    scc.sort();
                    self.found.push(scc);
                }
            }
        }
    }
    let mut walk = Walk::default();
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(graph, v);
        }
    }
    walk.found
}

/// One line per cycle: its members, then the imports between them.
fn describe(what: &str, graph: &Graph) -> String {
    let mut out = String::new();
    for scc in cycles(graph) {
        let inside = |a| {
            graph[a]
                .iter()
                .filter(|b| scc.contains(b))
                .map(move |b| format!("{a} → {b}"))
        };
        let edges: Vec<_> = scc.iter().flat_map(inside).collect();
        out += &format!(
            "cycle between {what} {}: {}\n",
            scc.join(", "),
            edges.join("; ")
        );
    }
    out
}

fn crate_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = format!("{rel}{}", path.file_name().unwrap().to_string_lossy());
            if path.is_dir() {
                walk(&path, &format!("{name}/"), out);
            } else if name.ends_with(".rs") {
                out.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let (src, mut out) = (Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), vec![]);
    walk(&src, "", &mut out);
    out
}

#[test]
fn no_source_file_imports_a_module_that_imports_it_back() {
    let (files, modules) = graphs(&crate_sources());
    assert!(
        files.values().any(|t| !t.is_empty()),
        "read no imports from src/"
    );
    let report = describe("files", &files) + &describe("top-level modules", &modules);
    assert!(
        report.is_empty(),
        "imports go only down the layers (DESIGN):\n{report}"
    );
}

/// A small tree with every way in: nested use trees, `super::`/`self::`, and imports the check
/// must ignore (in a comment, a string, `#[cfg(test)]` items and a test-only file).
fn tiny_tree(back_edge: &str) -> Vec<(String, String)> {
    let c = format!(
        "//! Called from crate::a.\nuse super::Shared;\npub struct Deep;\n#[cfg(test)]\nuse crate::a::g;\n\
         #[cfg(test)]\nmod tests {{\n    fn t() {{ let _ = ('}}', \"}}\"); crate::a::g(); }}\n}}\n\
         fn own() -> &'static str {{ self::own(); \"crate::a\" }}\n{back_edge}"
    );
    [
        ("lib.rs", "pub mod a;\npub mod b;\nuse crate::a::g;\n"),
        ("a.rs", "use crate::{b::{c::Deep, self}};\npub fn g() {}\n"),
        (
            "b/mod.rs",
            "pub mod c;\npub struct Shared;\n#[cfg(test)]\nmod tests;\n",
        ),
        ("b/tests.rs", "use crate::a::g;\n"),
        ("b/c.rs", &c),
    ]
    .map(|(rel, text)| (rel.to_string(), text.to_string()))
    .into()
}

#[test]
fn the_check_reads_the_imports_and_finds_no_cycle_where_there_is_none() {
    let (files, modules) = graphs(&tiny_tree(""));
    let edges = |g: &Graph| {
        g.iter()
            .flat_map(|(a, ts)| ts.iter().map(move |b| format!("{a}→{b}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(edges(&files), ["a→b", "a→b::c", "b::c→b"]);
    assert_eq!(edges(&modules), ["a→b"]);
    assert!(cycles(&files).is_empty() && cycles(&modules).is_empty());
}

#[test]
fn the_check_finds_a_cycle_planted_between_two_files() {
    let (files, modules) = graphs(&tiny_tree("fn back() { super::super::a::g() }\n"));
    assert_eq!(cycles(&files), [["a", "b::c"]]);
    assert_eq!(cycles(&modules), [["a", "b"]]);
    assert!(describe("files", &files).contains("a, b::c: a → b::c; b::c → a"));
}

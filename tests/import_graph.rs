//! No import circles: between the files of the library (`actors/src`) and
//! of the binary (`src/`), and between the library's rooms (its top folders
//! engine/, pool/, memory/, chat/, http/), whose arrows point down.
//! Reads the sources as text; no model, no server, no tool beyond the test.
//!
//! What counts as an arrow from file A to file B:
//! - a `use crate::…`, `use super::…`, `use self::…` (or a path from a child
//!   module of A, or from `modelpool_actors::` in the binary) in A that names
//!   B or an item of B; an item path resolves to the longest prefix that is a
//!   module file (`foo.rs` or `foo/mod.rs`), so `crate::pool::state::PoolState`
//!   is an arrow to `pool/state.rs`;
//! - the same paths written inline in code (`crate::engine::Fault` in a type
//!   or an expression), and paths through a name a `use` brought in
//!   (`use super::persist::{self}` then `persist::save(…)`).
//!
//! What does not:
//! - `mod x;`: a declaration is the tree, not an import. A parent that only
//!   declares its children is a router.
//! - A re-export (`pub use x::Y;`) whose name the file's own code does not
//!   use. A re-export is a door, not a dependency: a path that reaches an item
//!   through it (`crate::PoolHandle`, `super::Y`) is followed to the file that
//!   defines the item. So a `mod.rs` that declares and re-exports, and a child
//!   that imports a sibling through it, are no circle; but a re-export the
//!   parent also uses in its own code is an arrow like any `use`. (Counting
//!   every re-export would make each router a circle with each child that
//!   names a sibling through it; ignoring them entirely would hide the
//!   parent that re-exports a child's type and builds on it.)
//! - Comments, doc links and string literals.
//! - Test code: files declared by `#[cfg(test)] mod x;` (e.g.
//!   `pool/state/tests.rs`) and every `#[cfg(test)]` item (an inline
//!   `mod tests { use super::*; … }`). A test module reads its parent by
//!   nature.
//!
//! A parent and its child are two files like any other: a child that imports
//! from its parent (`use super::Something` defined in `mod.rs`) while the
//! parent imports the child is a circle. A `mod.rs` is a router (declarations
//! and re-exports), not a kit that its children take their helpers from; a
//! helper the children share goes in a file of its own.
//!
//! Rooms: a file belongs to the folder under `actors/src/` it sits in; the
//! binary (`src/`) is one room above all of them. The crate root's own files
//! (`lib.rs`, `error.rs`, `params.rs`: the errors and the request types of the
//! engine's seam, which every room speaks) count as engine/, the bottom room:
//! they may use engine/ and engine/ them, and nothing above. A room may
//! import any room below it and no other: http → chat → pool → engine,
//! chat → memory → engine; pool and memory are side by side and import
//! neither each other nor anything above. Each arrow that points up or
//! sideways is listed with the file and line that make it, and so is every
//! circle between rooms.
//!
//! A circle (a strongly connected component of more than one file) is listed
//! as closed chains, `a.rs → b.rs → a.rs`, that between them take every arrow
//! inside it, each arrow with the line that makes it: every arrow one might
//! cut is shown.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// The two crates read: the library and the binary.
const CRATES: [SourceRoot; 2] = [
    SourceRoot { dir: "actors/src", root_file: "lib.rs", extern_name: "modelpool_actors" },
    SourceRoot { dir: "src", root_file: "main.rs", extern_name: "modelpool" },
];

/// The rooms, lowest first; a room may import only rooms of a
/// lower rank. The crate root's own files count as engine/ (see the header).
const ROOMS: [(&str, u8); 6] =
    [("engine", 0), ("pool", 1), ("memory", 1), ("chat", 2), ("http", 3), ("src (binary)", 4)];

#[derive(Clone, Copy)]
struct SourceRoot {
    /// Relative to the repository root.
    dir: &'static str,
    root_file: &'static str,
    extern_name: &'static str,
}

// ---------------------------------------------------------------------------
// Reading a file: comments and literals out, tokens, `use` trees.

/// The source with comments, string and character literals replaced by
/// spaces (line breaks kept, so lines still count).
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (at(i + 1) == '"' || at(i + 1) == '#')
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
            && {
                let mut k = i + 1;
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // Raw string: r"…", r#"…"#, br"…".
            let mut hashes = 0;
            i += 1;
            out.push(' ');
            while c[i] == '#' {
                hashes += 1;
                i += 1;
                out.push(' ');
            }
            i += 1;
            out.push(' ');
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#') {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && (at(i + 1) == '\\' || (at(i + 1) != '\'' && at(i + 2) == '\'')) {
            // A character literal ('a', '\n', '\u{1F600}'); a lifetime stays.
            out.push(' ');
            i += 1;
            if c[i] == '\\' {
                // The backslash and the character it escapes (which may be a quote).
                out.push_str("  ");
                i += 2;
            }
            while i < c.len() && c[i] != '\'' {
                out.push(blank(c[i]));
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

/// Tokens with their line (1-based).
fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' || ch.is_ascii_digit() {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            if ch.is_ascii_digit() {
                out.push((Tok::Punct('0'), line));
            } else if word == "r" && c.get(i) == Some(&'#') {
                // r#ident
                i += 1;
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                out.push((Tok::Ident(c[start..i].iter().collect()), line));
            } else {
                out.push((Tok::Ident(word), line));
            }
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    out
}

fn is_ident(t: Option<&(Tok, usize)>, word: &str) -> bool {
    matches!(t, Some((Tok::Ident(w), _)) if w == word)
}

fn is_punct(t: Option<&(Tok, usize)>, ch: char) -> bool {
    matches!(t, Some((Tok::Punct(p), _)) if *p == ch)
}

/// Removes every `#[cfg(test)]` item from the tokens; returns the names of
/// the test modules declared out of line (`#[cfg(test)] mod tests;`).
fn drop_test_items(toks: &mut Vec<(Tok, usize)>) -> Vec<String> {
    let mut test_children = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let attr = is_punct(toks.get(i), '#')
            && is_punct(toks.get(i + 1), '[')
            && is_ident(toks.get(i + 2), "cfg")
            && is_punct(toks.get(i + 3), '(')
            && is_ident(toks.get(i + 4), "test")
            && is_punct(toks.get(i + 5), ')')
            && is_punct(toks.get(i + 6), ']');
        if !attr {
            i += 1;
            continue;
        }
        // An item (fn, mod, struct, use, …) ends at its first `;` outside
        // brackets, or with the braces it opens; a field, variant or match arm
        // also at a `,` or where its enclosing braces close.
        let mut k = i + 7;
        while is_punct(toks.get(k), '#') {
            while k < toks.len() && !is_punct(toks.get(k), ']') {
                k += 1;
            }
            k += 1;
        }
        let item_start = k;
        const ITEMS: [&str; 15] = [
            "fn", "mod", "impl", "struct", "enum", "trait", "const", "static", "type", "use", "let", "async", "unsafe",
            "extern", "pub",
        ];
        let is_item = matches!(toks.get(k), Some((Tok::Ident(w), _)) if ITEMS.contains(&w.as_str()));
        let mut depth = 0i32;
        loop {
            match toks.get(k) {
                None => break,
                Some((Tok::Punct('(' | '['), _)) => depth += 1,
                Some((Tok::Punct(')' | ']'), _)) if depth > 0 => depth -= 1,
                Some((Tok::Punct(';'), _)) if depth == 0 => break,
                Some((Tok::Punct(','), _)) if depth == 0 && !is_item => break,
                Some((Tok::Punct('}' | ')' | ']'), _)) if !is_item => {
                    k -= 1;
                    break;
                }
                Some((Tok::Punct('{'), _)) if depth == 0 => {
                    let mut braces = 0;
                    while let Some((t, _)) = toks.get(k) {
                        match t {
                            Tok::Punct('{') => braces += 1,
                            Tok::Punct('}') => {
                                braces -= 1;
                                if braces == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        k += 1;
                    }
                    if !is_item && is_punct(toks.get(k + 1), ',') {
                        k += 1;
                    }
                    break;
                }
                _ => {}
            }
            k += 1;
        }
        let item: Vec<&Tok> = toks[item_start..k.min(toks.len())].iter().map(|(t, _)| t).collect();
        if let [.., Tok::Ident(m), Tok::Ident(name)] = item.as_slice() {
            if m == "mod" && is_punct(toks.get(k), ';') {
                test_children.push(name.clone());
            }
        }
        toks.drain(i..(k + 1).min(toks.len()));
    }
    test_children
}

/// One name a `use` declaration brings in.
#[derive(Clone, Debug)]
struct UseLeaf {
    /// Segments as written (`super`, `crate`, …), without a trailing `self`.
    path: Vec<String>,
    /// The name it binds (`as` alias or the last segment); `None` for a glob.
    name: Option<String>,
    public: bool,
    line: usize,
}

/// Parses one use tree starting at `toks[i]`; returns the index after it.
fn parse_use_tree(
    toks: &[(Tok, usize)],
    mut i: usize,
    prefix: &[String],
    public: bool,
    out: &mut Vec<UseLeaf>,
) -> usize {
    let mut path = prefix.to_vec();
    if matches!(toks.get(i), Some((Tok::Path, _))) {
        i += 1;
    }
    loop {
        match toks.get(i) {
            Some((Tok::Ident(seg), line)) => {
                let line = *line;
                path.push(seg.clone());
                i += 1;
                if matches!(toks.get(i), Some((Tok::Path, _))) {
                    i += 1;
                    continue;
                }
                let mut name = path.last().cloned();
                if is_ident(toks.get(i), "as") {
                    if let Some((Tok::Ident(alias), _)) = toks.get(i + 1) {
                        name = Some(alias.clone());
                    }
                    i += 2;
                }
                if path.last().map(String::as_str) == Some("self") {
                    path.pop();
                    if name.as_deref() == Some("self") {
                        name = path.last().cloned();
                    }
                }
                if name.as_deref() != Some("_") {
                    out.push(UseLeaf { path, name, public, line });
                }
                return i;
            }
            Some((Tok::Punct('*'), line)) => {
                out.push(UseLeaf { path, name: None, public, line: *line });
                return i + 1;
            }
            Some((Tok::Punct('{'), _)) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        None => return i,
                        Some((Tok::Punct('}'), _)) => return i + 1,
                        Some((Tok::Punct(','), _)) => i += 1,
                        _ => i = parse_use_tree(toks, i, &path, public, out),
                    }
                }
            }
            _ => return i + 1,
        }
    }
}

/// One file, read.
struct Parsed {
    /// The `use` declarations' leaves.
    uses: Vec<UseLeaf>,
    /// Paths written in code (two segments or more), with their line.
    inline: Vec<(Vec<String>, usize)>,
    /// Identifiers of the code outside `use` declarations.
    idents: BTreeSet<String>,
    test_children: Vec<String>,
}

fn parse(src: &str) -> Parsed {
    let mut toks = tokens(&strip(src));
    let test_children = drop_test_items(&mut toks);
    let mut uses = Vec::new();
    let mut in_use = vec![false; toks.len()];
    let mut i = 0;
    while i < toks.len() {
        let is_use = is_ident(toks.get(i), "use")
            && !matches!(toks.get(i.wrapping_sub(1)), Some((Tok::Path, _)))
            && !is_punct(toks.get(i.wrapping_sub(1)), '.');
        if !is_use {
            i += 1;
            continue;
        }
        // `pub use`, `pub(crate) use`, `pub(in path) use`.
        let mut start = i;
        if is_punct(toks.get(i.wrapping_sub(1)), ')') {
            let mut k = i - 1;
            while k > 0 && !is_punct(toks.get(k), '(') {
                k -= 1;
            }
            if is_ident(toks.get(k.wrapping_sub(1)), "pub") {
                start = k - 1;
            }
        } else if is_ident(toks.get(i.wrapping_sub(1)), "pub") {
            start = i - 1;
        }
        let public = start < i;
        let end = parse_use_tree(&toks, i + 1, &[], public, &mut uses);
        let mut end = end;
        while end < toks.len() && !is_punct(toks.get(end), ';') {
            end += 1;
        }
        for flag in &mut in_use[start..(end + 1).min(toks.len())] {
            *flag = true;
        }
        i = end + 1;
    }
    let mut inline = Vec::new();
    let mut idents = BTreeSet::new();
    let mut i = 0;
    while i < toks.len() {
        if in_use[i] {
            i += 1;
            continue;
        }
        if let (Tok::Ident(first), line) = &toks[i] {
            idents.insert(first.clone());
            let after_path = matches!(toks.get(i.wrapping_sub(1)), Some((Tok::Path, _)));
            if !after_path {
                let mut path = vec![first.clone()];
                let mut k = i + 1;
                while matches!(toks.get(k), Some((Tok::Path, _))) {
                    match toks.get(k + 1) {
                        Some((Tok::Ident(seg), _)) => {
                            path.push(seg.clone());
                            k += 2;
                        }
                        _ => break,
                    }
                }
                if path.len() > 1 {
                    inline.push((path, *line));
                }
            }
        }
        i += 1;
    }
    Parsed { uses, inline, idents, test_children }
}

// ---------------------------------------------------------------------------
// The graph of files.

struct SourceFile {
    /// Repository-relative path.
    rel: String,
    krate: usize,
    /// Module path in its crate (`["pool", "state"]`; `[]` for the root).
    module: Vec<String>,
    parsed: Parsed,
    lines: Vec<String>,
}

/// Files and the arrows between them, each arrow with the first line that
/// makes it (`file:line  text`).
struct FileGraph {
    files: Vec<SourceFile>,
    /// Test files: not part of the graph.
    test: Vec<bool>,
    edges: Vec<BTreeMap<usize, String>>,
}

impl FileGraph {
    /// Builds the graph of the given files (repository-relative path, text).
    fn build(sources: Vec<(String, String)>) -> FileGraph {
        let mut files = Vec::new();
        for (rel, text) in sources {
            let Some((krate, root)) = CRATES.iter().enumerate().find(|(_, c)| rel.starts_with(&format!("{}/", c.dir)))
            else {
                continue;
            };
            let inner = &rel[root.dir.len() + 1..];
            let mut module: Vec<String> = inner.trim_end_matches(".rs").split('/').map(String::from).collect();
            if inner == root.root_file || module.last().map(String::as_str) == Some("mod") {
                module.pop();
            }
            let lines = text.lines().map(String::from).collect();
            files.push(SourceFile { rel, krate, module, parsed: parse(&text), lines });
        }
        let mut graph = FileGraph { test: vec![false; files.len()], edges: vec![BTreeMap::new(); files.len()], files };
        // Test modules and everything under them.
        let mut test_modules = Vec::new();
        for f in &graph.files {
            for child in &f.parsed.test_children {
                let mut m = f.module.clone();
                m.push(child.clone());
                test_modules.push((f.krate, m));
            }
        }
        for (i, f) in graph.files.iter().enumerate() {
            graph.test[i] = test_modules.iter().any(|(k, m)| *k == f.krate && f.module.starts_with(m));
        }
        for from in 0..graph.files.len() {
            if graph.test[from] {
                continue;
            }
            let f = &graph.files[from];
            let mut arrows: Vec<(Vec<String>, usize)> = Vec::new();
            for u in &f.parsed.uses {
                // A re-export the file's own code does not use is a door.
                if u.public && u.name.as_ref().is_none_or(|n| !f.parsed.idents.contains(n)) {
                    continue;
                }
                arrows.push((u.path.clone(), u.line));
            }
            arrows.extend(f.parsed.inline.iter().cloned());
            for (path, line) in arrows {
                if let Some(to) = graph.resolve(from, &path, 0) {
                    if to != from && !graph.test[to] {
                        let text = f.lines.get(line - 1).map(|l| l.trim()).unwrap_or("");
                        let text: String = text.chars().take(110).collect();
                        graph.edges[from].entry(to).or_insert_with(|| format!("{}:{}  {}", f.rel, line, text));
                    }
                }
            }
        }
        graph
    }

    fn module_file(&self, krate: usize, module: &[String]) -> Option<usize> {
        self.files.iter().position(|f| f.krate == krate && f.module == module)
    }

    /// The file a path written in `from` leads to: the longest module prefix,
    /// then through any `use` of that file that brought the item's name in.
    /// `None` for paths outside the two crates (std, dependencies, local
    /// types and variants).
    fn resolve(&self, from: usize, path: &[String], depth: usize) -> Option<usize> {
        if depth > 16 || path.is_empty() {
            return None;
        }
        let f = &self.files[from];
        let mut krate = f.krate;
        let mut base: Vec<String> = f.module.clone();
        let mut rest = path;
        match path[0].as_str() {
            "crate" => {
                base.clear();
                rest = &path[1..];
            }
            "self" => rest = &path[1..],
            "super" => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            first => {
                if let Some(k) = CRATES.iter().position(|c| c.extern_name == first && k_differs(c, f.krate)) {
                    krate = k;
                    base.clear();
                    rest = &path[1..];
                } else {
                    let mut child = base.clone();
                    child.push(first.to_string());
                    if self.module_file(krate, &child).is_none() {
                        // A name a `use` of this file brought in.
                        let leaf = f.parsed.uses.iter().find(|u| u.name.as_deref() == Some(first))?;
                        if leaf.path.first().map(String::as_str) == Some(first) && leaf.path.len() == 1 {
                            return None;
                        }
                        let mut whole = leaf.path.clone();
                        whole.extend_from_slice(&path[1..]);
                        return self.resolve(from, &whole, depth + 1);
                    }
                }
            }
        }
        let mut full = base;
        full.extend_from_slice(rest);
        let (file, used) = (0..=full.len()).rev().find_map(|n| self.module_file(krate, &full[..n]).map(|i| (i, n)))?;
        // An item the target file imported (or re-exported) from elsewhere
        // leads to the file that defines it.
        if let Some(item) = full.get(used) {
            let target = &self.files[file];
            if let Some(leaf) = target.parsed.uses.iter().find(|u| u.name.as_deref() == Some(item.as_str())) {
                let mut whole = leaf.path.clone();
                whole.extend_from_slice(&full[used + 1..]);
                if let Some(to) = self.resolve(file, &whole, depth + 1) {
                    return Some(to);
                }
            }
        }
        Some(file)
    }

    fn adjacency(&self) -> Vec<Vec<usize>> {
        self.edges.iter().map(|e| e.keys().copied().collect()).collect()
    }

    /// The room of a file (see the header): the crate root's own files count as
    /// engine/.
    fn room(&self, i: usize) -> &'static str {
        let f = &self.files[i];
        if f.krate == 1 {
            return "src (binary)";
        }
        let dir = Path::new(&f.rel).strip_prefix(CRATES[0].dir).ok().and_then(|p| p.components().next());
        let top = dir.map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        ROOMS.iter().map(|(r, _)| *r).find(|r| *r == top).unwrap_or("engine")
    }
}

fn k_differs(c: &SourceRoot, krate: usize) -> bool {
    CRATES[krate].dir != c.dir
}

// ---------------------------------------------------------------------------
// Cycles.

/// Strongly connected components of more than one node (Tarjan), each sorted,
/// in order of their smallest node.
fn circles(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct Walk<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.adj[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let n = adj.len();
    let mut walk = Walk {
        adj,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if walk.index[v].is_none() {
            walk.visit(v);
        }
    }
    walk.out.sort();
    walk.out
}

/// Closed chains (`[a, b, a]`) inside one component such that every arrow
/// between its members lies on at least one of them: each is an arrow
/// followed by the shortest way back.
fn chains(adj: &[Vec<usize>], scc: &[usize]) -> Vec<Vec<usize>> {
    let inside = |v: usize| scc.binary_search(&v).is_ok();
    let mut covered = BTreeSet::new();
    let mut out = Vec::new();
    for &u in scc {
        for &v in adj[u].iter().filter(|&&v| inside(v)) {
            if covered.contains(&(u, v)) {
                continue;
            }
            // Shortest way from v back to u, within the component.
            let mut prev = BTreeMap::new();
            let mut queue = VecDeque::from([v]);
            prev.insert(v, v);
            while let Some(x) = queue.pop_front() {
                if x == u {
                    break;
                }
                for &y in adj[x].iter().filter(|&&y| inside(y)) {
                    if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(y) {
                        e.insert(x);
                        queue.push_back(y);
                    }
                }
            }
            let mut back = vec![u];
            let mut x = u;
            while x != v {
                x = prev[&x];
                back.push(x);
            }
            back.reverse();
            let mut chain = vec![u];
            chain.extend(back);
            for w in chain.windows(2) {
                covered.insert((w[0], w[1]));
            }
            out.push(chain);
        }
    }
    out
}

/// Every `.rs` file of both crates, repository-relative, with its text.
fn read_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read a source folder").flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).expect("under the root").to_string_lossy().into_owned();
                out.push((rel, std::fs::read_to_string(&p).expect("read a source file")));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for c in CRATES {
        walk(&root.join(c.dir), root, &mut out);
    }
    out
}

/// The file-level circles, written out; empty when there are none.
fn file_report(g: &FileGraph) -> String {
    let adj = g.adjacency();
    let mut report = String::new();
    for scc in circles(&adj) {
        let names: Vec<&str> = scc.iter().map(|&i| g.files[i].rel.as_str()).collect();
        report.push_str(&format!("\nimport circle among {} files: {}\n", scc.len(), names.join(", ")));
        for chain in chains(&adj, &scc) {
            let names: Vec<&str> = chain.iter().map(|&i| g.files[i].rel.as_str()).collect();
            report.push_str(&format!("  {}\n", names.join(" → ")));
            for w in chain.windows(2) {
                report.push_str(&format!("      {}\n", g.edges[w[0]][&w[1]]));
            }
        }
    }
    report
}

/// The room-level circles and upward arrows, written out; empty when none.
fn room_report(g: &FileGraph) -> String {
    let rank = |r: &str| ROOMS.iter().find(|(n, _)| *n == r).map(|(_, k)| *k).expect("a known room");
    let index = |r: &str| ROOMS.iter().position(|(n, _)| *n == r).expect("a known room");
    // Arrows between rooms, each with the file arrows that make it.
    let mut between: BTreeMap<(usize, usize), Vec<&str>> = BTreeMap::new();
    for (from, edges) in g.edges.iter().enumerate() {
        for (&to, why) in edges {
            let (a, b) = (index(g.room(from)), index(g.room(to)));
            if a != b {
                between.entry((a, b)).or_default().push(why);
            }
        }
    }
    let mut adj = vec![Vec::new(); ROOMS.len()];
    for &(a, b) in between.keys() {
        adj[a].push(b);
    }
    let mut report = String::new();
    for scc in circles(&adj) {
        let names: Vec<&str> = scc.iter().map(|&i| ROOMS[i].0).collect();
        report.push_str(&format!("\nrooms importing each other: {}\n", names.join(", ")));
        for chain in chains(&adj, &scc) {
            let names: Vec<&str> = chain.iter().map(|&i| ROOMS[i].0).collect();
            report.push_str(&format!("  {}\n", names.join(" → ")));
        }
    }
    for (&(a, b), why) in &between {
        let (from, to) = (ROOMS[a].0, ROOMS[b].0);
        if rank(to) >= rank(from) {
            report.push_str(&format!("\n{from} imports {to}, which is not below it ({} arrows):\n", why.len()));
            for w in why {
                report.push_str(&format!("      {w}\n"));
            }
        }
    }
    report
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let g = FileGraph::build(read_sources());
    assert!(g.files.len() > 50, "the sources were found: {} files", g.files.len());
    assert!(g.edges.iter().map(|e| e.len()).sum::<usize>() > 100, "the imports were read");
    let report = file_report(&g);
    assert!(
        report.is_empty(),
        "import circles (break each by moving what both sides need to the file that should own it):{report}"
    );
}

#[test]
fn no_room_imports_a_room_above_or_beside_it() {
    let g = FileGraph::build(read_sources());
    let report = room_report(&g);
    assert!(report.is_empty(), "rooms out of order (http → chat → pool → engine, chat → memory → engine):{report}");
}

// ---------------------------------------------------------------------------
// The check checked: it must see circles where they are.

#[test]
fn the_circle_finder_finds_components_and_closes_chains() {
    // a → b → c → a, c → d, d ⇄ e, f alone, f → a.
    let adj = vec![vec![1], vec![2], vec![0, 3], vec![4], vec![3], vec![0]];
    assert_eq!(circles(&adj), vec![vec![0, 1, 2], vec![3, 4]]);
    assert_eq!(chains(&adj, &[0, 1, 2]), vec![vec![0, 1, 2, 0]]);
    assert_eq!(chains(&adj, &[3, 4]), vec![vec![3, 4, 3]]);
    // Two ways round one component: both arrows out of a are shown.
    let adj = vec![vec![1, 2], vec![0], vec![0]];
    assert_eq!(chains(&adj, &[0, 1, 2]), vec![vec![0, 1, 0], vec![0, 2, 0]]);
    // A tree has none.
    assert!(circles(&[vec![1, 2], vec![2], vec![]]).is_empty());
}

fn tree(files: &[(&str, &str)]) -> FileGraph {
    FileGraph::build(files.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect())
}

fn arrow(g: &FileGraph, from: &str, to: &str) -> bool {
    let i = |p: &str| g.files.iter().position(|f| f.rel == p).unwrap_or_else(|| panic!("{p} is in the tree"));
    g.edges[i(from)].contains_key(&i(to))
}

#[test]
fn the_reader_resolves_uses_inline_paths_and_re_exports() {
    let g = tree(&[
        ("actors/src/lib.rs", "pub mod a;\npub mod b;\npub use a::x::Thing;\n"),
        // A router: declares and re-exports, uses nothing itself.
        ("actors/src/a/mod.rs", "pub mod x;\npub mod y;\npub use x::Thing;\n"),
        ("actors/src/a/x.rs", "pub struct Thing;\n// use crate::a::y::Other;\nconst S: &str = \"crate::b::Z\";\n"),
        ("actors/src/a/y.rs", "use super::Thing;\nconst Q: [char; 2] = ['\\'', '\"'];\nfn f() -> crate::b::Z { todo!() }\n"),
        (
            "actors/src/b.rs",
            "pub struct Z;\nuse crate::{a::{self}};\nconst R: &str = r#\"crate::a::x::Thing\"#;\nfn g() { let _ = a::y::h; }\n",
        ),
        ("src/main.rs", "mod config;\nfn main() { modelpool_actors::Thing; }\n"),
        ("src/config.rs", "use modelpool_actors::a;\n"),
    ]);
    assert!(arrow(&g, "actors/src/a/y.rs", "actors/src/a/x.rs"), "super::Thing goes through the re-export");
    assert!(!arrow(&g, "actors/src/a/y.rs", "actors/src/a/mod.rs"));
    assert!(arrow(&g, "actors/src/a/y.rs", "actors/src/b.rs"), "an inline crate:: path");
    assert!(arrow(&g, "actors/src/b.rs", "actors/src/a/y.rs"), "a path through a `use`d module name");
    assert!(!arrow(&g, "actors/src/a/x.rs", "actors/src/a/y.rs"), "comments do not count");
    assert!(!arrow(&g, "actors/src/a/x.rs", "actors/src/b.rs"), "strings do not count");
    assert!(!arrow(&g, "actors/src/b.rs", "actors/src/a/x.rs"), "raw strings do not count");
    assert!(!arrow(&g, "actors/src/a/mod.rs", "actors/src/a/x.rs"), "a bare re-export is no arrow");
    assert!(!arrow(&g, "actors/src/lib.rs", "actors/src/a/x.rs"));
    assert!(arrow(&g, "src/main.rs", "actors/src/a/x.rs"), "the binary's arrows into the library");
    assert!(arrow(&g, "src/config.rs", "actors/src/a/mod.rs"));
    let report = file_report(&g);
    assert!(report.contains("actors/src/a/y.rs → actors/src/b.rs → actors/src/a/y.rs"), "{report}");
}

#[test]
fn a_kit_parent_and_its_child_are_a_circle_and_test_code_is_not() {
    let g = tree(&[
        ("actors/src/lib.rs", "pub mod pool;\npub mod engine;\n"),
        // The parent builds on its child's type and hands it a helper.
        (
            "actors/src/pool/mod.rs",
            "mod state;\npub use state::State;\npub fn helper() {}\nfn make() -> State { todo!() }\n",
        ),
        ("actors/src/pool/state.rs", "use super::helper;\npub struct State;\n#[cfg(test)]\nmod tests;\n"),
        ("actors/src/pool/state/tests.rs", "use crate::pool::helper;\nuse super::*;\n"),
        ("actors/src/engine/mod.rs", "#[cfg(test)]\nmod tests {\n    use crate::pool::State;\n}\n"),
    ]);
    assert!(arrow(&g, "actors/src/pool/mod.rs", "actors/src/pool/state.rs"), "a re-export the parent uses");
    assert!(arrow(&g, "actors/src/pool/state.rs", "actors/src/pool/mod.rs"));
    assert!(g.test[g.files.iter().position(|f| f.rel.ends_with("state/tests.rs")).unwrap()]);
    assert!(!arrow(&g, "actors/src/engine/mod.rs", "actors/src/pool/state.rs"), "inline test modules do not count");
    let report = file_report(&g);
    assert!(report.contains("actors/src/pool/mod.rs → actors/src/pool/state.rs → actors/src/pool/mod.rs"), "{report}");
    assert!(room_report(&g).is_empty(), "{}", room_report(&g));
}

#[test]
fn a_room_that_imports_upwards_is_named() {
    let g = tree(&[
        ("actors/src/lib.rs", "pub mod pool;\npub mod engine;\npub mod memory;\n"),
        ("actors/src/pool/mod.rs", "use crate::engine::Engine;\nuse crate::memory::Store;\n"),
        ("actors/src/engine/mod.rs", "pub struct Engine;\nfn f(_: crate::pool::Lease) {}\n"),
        ("actors/src/memory/mod.rs", "pub struct Store;\n"),
    ]);
    let report = room_report(&g);
    assert!(report.contains("rooms importing each other: engine, pool"), "{report}");
    assert!(report.contains("engine imports pool, which is not below it"), "{report}");
    assert!(report.contains("pool imports memory, which is not below it"), "{report}");
    assert!(report.contains("actors/src/engine/mod.rs:2"), "{report}");
}

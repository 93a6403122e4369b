//! The architecture's invariants, checked against the source tree (as
//! rust-analyzer's `tidy.rs` does): a rule no test enforces drifts.
//! ARCHITECTURE.md lists each rule and names the test here that enforces
//! it. Each rule is a function over (path, text) pairs, so the unit tests at
//! the end feed it a tree that breaks it and see it fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest a source file may be before its test module.
const MAX_LINES: usize = 800;

/// One source file of the crate, as the rules see it.
struct File {
    /// Relative to the crate root, like `src/plan/diff.rs`.
    path: String,
    /// The text before the file's test module, comments blanked.
    code: String,
    /// The whole text, its tests included, comments blanked.
    all_code: String,
    /// How many lines come before its test module.
    lines: usize,
    /// Whether it is test code as a whole (a `tests.rs`).
    test_only: bool,
}

impl File {
    fn new(path: &str, text: &str) -> File {
        let before_tests = match text.find("\n#[cfg(test)]\nmod ") {
            Some(i) => &text[..i],
            None => text,
        };
        File {
            path: path.to_owned(),
            code: strip_comments(before_tests),
            all_code: strip_comments(text),
            lines: before_tests.lines().count(),
            test_only: path.ends_with("/tests.rs"),
        }
    }

    fn under(&self, dir: &str) -> bool {
        self.path.starts_with(dir)
    }

    fn product(&self) -> bool {
        !self.test_only
    }
}

/// The text with `//` comments blanked (outside string literals, roughly:
/// a `//` after an odd number of quotes on its line is kept).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| {
            let mut quotes = 0;
            let bytes = line.as_bytes();
            for i in 0..bytes.len() {
                match bytes[i] {
                    b'"' if i == 0 || bytes[i - 1] != b'\\' => quotes += 1,
                    b'/' if quotes % 2 == 0 && bytes.get(i + 1) == Some(&b'/') => {
                        return &line[..i];
                    }
                    _ => {}
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn source_files(root: &Path) -> Vec<File> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<File>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read a source directory")
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                let rel = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .to_string_lossy()
                    .into_owned();
                out.push(File::new(&rel, &text));
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join("src"), root, &mut out);
    out
}

/// `file:line: what` for every line outside `allowed` directories that
/// contains one of `needles` as a word; tests included when `tests`.
fn find_outside(
    files: &[File],
    allowed: &[&str],
    needles: &[&str],
    tests: bool,
    what: &str,
) -> Vec<String> {
    let mut found = Vec::new();
    for file in files
        .iter()
        .filter(|f| !allowed.iter().any(|dir| f.under(dir)))
    {
        let code = if tests { &file.all_code } else { &file.code };
        for (n, line) in code.lines().enumerate() {
            for needle in needles {
                if contains_word(line, needle) {
                    found.push(format!("{}:{}: {what} ({needle})", file.path, n + 1));
                }
            }
        }
    }
    found
}

fn contains_word(line: &str, needle: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(needle).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + needle.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// `spec` and `plan` import no tokio, and do no IO.
fn rule_pure_spec_and_plan(files: &[File]) -> Vec<String> {
    let pure: Vec<&File> = files
        .iter()
        .filter(|f| f.under("src/spec/") || f.under("src/plan/"))
        .collect();
    let mut found = Vec::new();
    for file in pure {
        for (n, line) in file.code.lines().enumerate() {
            for needle in [
                "tokio",
                "std::fs",
                "std::process",
                "std::os::unix::net",
                "TcpStream",
                "UdpSocket",
                "File::open",
                "File::create",
            ] {
                if line.contains(needle) {
                    found.push(format!(
                        "{}:{}: IO or tokio in pure code ({needle})",
                        file.path,
                        n + 1
                    ));
                }
            }
        }
    }
    found
}

/// Only `store` names sled.
fn rule_only_store_names_sled(files: &[File]) -> Vec<String> {
    find_outside(
        files,
        &["src/store/"],
        &["sled"],
        true,
        "sled outside store",
    )
}

/// Only `driver` spawns processes, its tests included.
fn rule_only_driver_spawns(files: &[File]) -> Vec<String> {
    find_outside(
        files,
        &["src/driver/"],
        &[
            "Command::new",
            "process::Command",
            "tokio::process",
            "std::process::Child",
        ],
        true,
        "a process spawned outside driver",
    )
}

/// Only `driver` and `api` open sockets, their tests included.
fn rule_only_driver_and_api_open_sockets(files: &[File]) -> Vec<String> {
    find_outside(
        files,
        &["src/driver/", "src/api/"],
        &[
            "UnixStream",
            "UnixListener",
            "TcpStream",
            "TcpListener",
            "UdpSocket",
        ],
        true,
        "a socket outside driver and api",
    )
}

/// No product file is longer than [`MAX_LINES`] before its test module.
fn rule_short_files(files: &[File]) -> Vec<String> {
    files
        .iter()
        .filter(|f| f.product() && f.lines > MAX_LINES)
        .map(|f| {
            format!(
                "{}: {} lines before its tests (at most {MAX_LINES})",
                f.path, f.lines
            )
        })
        .collect()
}

/// Every file opens with a `//!` paragraph saying what it is for.
fn rule_files_say_what_they_are(texts: &[(String, String)]) -> Vec<String> {
    texts
        .iter()
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(path, _)| format!("{path}: does not open with a //! paragraph"))
        .collect()
}

/// The module path of a file: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`.
fn module_of(path: &str) -> Option<Vec<String>> {
    let rel = path.strip_prefix("src/")?.strip_suffix(".rs")?;
    if rel == "lib" {
        return Some(Vec::new());
    }
    if rel == "main" {
        return None;
    }
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// Every path a file names (`use` trees expanded, inline paths too), as
/// absolute segment lists.
fn named_paths(module: &[String], children: &[String], code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // `super` of module a::b (`a/b.rs` or `a/b/mod.rs`) is a.
    let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
    let resolve = |segments: &[&str]| -> Option<Vec<String>> {
        let (base, rest): (Vec<String>, &[&str]) = match *segments.first()? {
            "crate" => (Vec::new(), &segments[1..]),
            "super" => {
                let mut base = parent.clone();
                let mut rest = &segments[1..];
                while rest.first() == Some(&"super") {
                    base.pop();
                    rest = &rest[1..];
                }
                (base, rest)
            }
            "self" => (module.to_vec(), &segments[1..]),
            // A child module (`use a::A` in `c/mod.rs`), or another crate:
            // that resolves to this file itself, which is no edge.
            _ => (module.to_vec(), segments),
        };
        let mut path = base;
        path.extend(rest.iter().map(|s| (*s).to_owned()));
        Some(path)
    };
    // `use` trees.
    for statement in use_statements(code) {
        for leaf in expand_use_tree(&statement) {
            let segments: Vec<&str> = leaf.split("::").map(str::trim).collect();
            if let Some(path) = resolve(&segments) {
                out.push(path);
            }
        }
    }
    // Inline paths: `crate::a::b`, `super::c`, and a child's `child::x`.
    let bytes = code.as_bytes();
    let child_anchors: Vec<String> = children.iter().map(|c| format!("{c}::")).collect();
    let anchors = ["crate::".to_owned(), "super::".to_owned()]
        .into_iter()
        .chain(child_anchors);
    for anchor in anchors {
        let relative = anchor != "crate::" && anchor != "super::";
        for (i, _) in code.match_indices(anchor.as_str()) {
            if i > 0
                && (bytes[i - 1].is_ascii_alphanumeric()
                    || bytes[i - 1] == b'_'
                    || bytes[i - 1] == b':')
            {
                continue;
            }
            let tail: String = code[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segments: Vec<&str> = tail.split("::").filter(|s| !s.is_empty()).collect();
            let path = if relative {
                let mut path = module.to_vec();
                path.extend(segments.iter().map(|s| (*s).to_owned()));
                Some(path)
            } else {
                resolve(&segments)
            };
            if let Some(path) = path {
                out.push(path);
            }
        }
    }
    out
}

/// The trees of every `use` item (`pub use` too), each without `use` and `;`.
fn use_statements(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let after_vis = trimmed
            .strip_prefix("pub(crate) ")
            .or_else(|| trimmed.strip_prefix("pub(super) "))
            .or_else(|| trimmed.strip_prefix("pub "))
            .unwrap_or(trimmed);
        if let Some(rest) = after_vis.strip_prefix("use ") {
            let start = offset + (line.len() - rest.len());
            if let Some(end) = code[start..].find(';') {
                out.push(code[start..start + end].to_owned());
            }
        }
        offset += line.len();
    }
    out
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e` (aliases dropped).
fn expand_use_tree(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let leaf = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![leaf.trim_end_matches("::*").to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let close = tree.rfind('}').unwrap_or(tree.len());
    let inner = &tree[open + 1..close];
    let mut items = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .flat_map(|item| {
            expand_use_tree(item)
                .into_iter()
                .map(|leaf| {
                    if leaf == "self" {
                        prefix.to_owned()
                    } else {
                        format!("{prefix}::{leaf}")
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// No two product files import each other in a loop, directly or through
/// others. Returns each loop found, as its files.
fn rule_no_import_cycles(files: &[File]) -> Vec<String> {
    let modules: BTreeMap<Vec<String>, &str> = files
        .iter()
        .filter(|f| f.product())
        .filter_map(|f| module_of(&f.path).map(|m| (m, f.path.as_str())))
        .collect();
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for file in files.iter().filter(|f| f.product()) {
        let Some(module) = module_of(&file.path) else {
            continue;
        };
        let targets = edges.entry(file.path.as_str()).or_default();
        let children: Vec<String> = modules
            .keys()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(&module))
            .filter_map(|m| m.last().cloned())
            .collect();
        for path in named_paths(&module, &children, &file.code) {
            // The deepest module the path names is the file it depends on.
            let target = (0..=path.len())
                .rev()
                .find_map(|n| modules.get(&path[..n]))
                .copied();
            // `lib.rs` only declares the modules: naming the crate root is
            // no dependency.
            if let Some(target) = target.filter(|t| *t != file.path && *t != "src/lib.rs") {
                targets.insert(target);
            }
        }
    }
    strongly_connected(&edges)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| {
            format!(
                "files that import each other in a loop: {}",
                scc.join(" -> ")
            )
        })
        .collect()
}

/// Tarjan's strongly connected components, each sorted.
fn strongly_connected<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    struct State<'a> {
        index: usize,
        indices: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(v: &'a str, edges: &BTreeMap<&'a str, BTreeSet<&'a str>>, s: &mut State<'a>) {
        s.indices.insert(v, s.index);
        s.low.insert(v, s.index);
        s.index += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in edges.get(v).into_iter().flatten() {
            if !s.indices.contains_key(w) {
                visit(w, edges, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.indices[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.indices[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w);
                if w == v {
                    break;
                }
            }
            scc.sort_unstable();
            s.out.push(scc);
        }
    }
    let mut state = State {
        index: 0,
        indices: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in edges.keys() {
        if !state.indices.contains_key(v) {
            visit(v, edges, &mut state);
        }
    }
    state.out
}

/// ARCHITECTURE.md's code map names every folder of the crate's code.
fn rule_code_map_lists_every_folder(root: &Path, architecture: &str) -> Vec<String> {
    let mut folders = BTreeSet::new();
    for top in ["src", "tests", "crates"] {
        collect_folders(&root.join(top), root, &mut folders);
    }
    folders
        .into_iter()
        .filter(|f| !f.ends_with("/snapshots") && !f.contains("/snapshots/"))
        .filter(|f| !architecture.contains(&format!("`{f}/")))
        .map(|f| format!("ARCHITECTURE.md's code map does not list {f}/"))
        .collect()
}

fn collect_folders(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.insert(
                path.strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned(),
            );
            collect_folders(&path, root, out);
        }
    }
}

fn assert_none(rule: &str, found: Vec<String>) {
    assert!(
        found.is_empty(),
        "{rule} is broken:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_source_tree_keeps_every_architecture_invariant() {
    let root = crate_root();
    let files = source_files(&root);
    assert!(files.len() > 50, "found only {} source files", files.len());
    let texts: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(root.join(&f.path)).expect("read");
            (f.path.clone(), text)
        })
        .collect();
    let architecture =
        std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let broken: Vec<String> = [
        (
            "`spec` and `plan` are pure",
            rule_pure_spec_and_plan(&files),
        ),
        (
            "only `store` names sled",
            rule_only_store_names_sled(&files),
        ),
        (
            "only `driver` spawns processes",
            rule_only_driver_spawns(&files),
        ),
        (
            "only `driver` and `api` open sockets",
            rule_only_driver_and_api_open_sockets(&files),
        ),
        (
            "no file over 800 lines before its tests",
            rule_short_files(&files),
        ),
        ("no import cycles", rule_no_import_cycles(&files)),
        (
            "every file says what it is",
            rule_files_say_what_they_are(&texts),
        ),
        (
            "the code map lists every folder",
            rule_code_map_lists_every_folder(&root, &architecture),
        ),
        ("no merge left unresolved", {
            let mut docs: Vec<(String, String)> = ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md"]
                .iter()
                .map(|d| {
                    let text = std::fs::read_to_string(root.join(d)).unwrap_or_default();
                    ((*d).to_owned(), text)
                })
                .collect();
            docs.extend(texts.iter().cloned());
            rule_no_conflict_markers(&docs)
        }),
    ]
    .into_iter()
    .filter(|(_, found)| !found.is_empty())
    .map(|(rule, found)| format!("{rule} is broken:\n  {}", found.join("\n  ")))
    .collect();
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Lines a merge left: `<<<<<<< `, `=======` alone, `>>>>>>> `.
fn rule_no_conflict_markers(texts: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, text) in texts {
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("<<<<<<< ") || line.starts_with(">>>>>>> ") || line == "=======" {
                found.push(format!("{path}:{}: {line}", n + 1));
            }
        }
    }
    found
}

// ---------------------------------------------------------------- the rules fail

#[test]
fn tidy_catches_a_merge_left_unresolved() {
    let texts = vec![
        (
            "ARCHITECTURE.md".to_owned(),
            "a\n<<<<<<< HEAD\nb\n=======\nc\n>>>>>>> x\n".to_owned(),
        ),
        (
            "src/x.rs".to_owned(),
            "//! fine\nlet s = \"=======\";\n".to_owned(),
        ),
    ];
    let found = rule_no_conflict_markers(&texts);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].starts_with("ARCHITECTURE.md:2"), "{found:?}");
}

fn tree(files: &[(&str, &str)]) -> Vec<File> {
    files.iter().map(|(p, t)| File::new(p, t)).collect()
}

#[test]
fn tidy_catches_tokio_in_plan_and_sled_outside_store() {
    let files = tree(&[
        ("src/plan/diff.rs", "//! x\nuse tokio::time::sleep;\n"),
        ("src/controller/x.rs", "//! x\nfn f(db: sled::Db) {}\n"),
        ("src/store/mod.rs", "//! x\nuse sled::Db;\n"),
    ]);
    assert_eq!(rule_pure_spec_and_plan(&files).len(), 1);
    let sled = rule_only_store_names_sled(&files);
    assert_eq!(sled.len(), 1, "{sled:?}");
    assert!(sled[0].starts_with("src/controller/x.rs:2"), "{sled:?}");
}

#[test]
fn tidy_catches_processes_and_sockets_outside_their_modules() {
    let files = tree(&[
        (
            "src/cli/vm.rs",
            "//! x\nlet s = UnixStream::connect(p);\nCommand::new(\"stty\");\n",
        ),
        (
            "src/store/tests.rs",
            "//! x\nstd::process::Command::new(exe);\n",
        ),
        (
            "src/driver/local.rs",
            "//! x\nCommand::new(\"sh\");\nUnixStream::connect(p);\n",
        ),
        ("src/api/mod.rs", "//! x\nUnixListener::bind(p);\n"),
        (
            "src/cli/ok.rs",
            "//! x\n// UnixStream in a comment is fine\n",
        ),
    ]);
    let spawns = rule_only_driver_spawns(&files);
    assert_eq!(spawns.len(), 3, "{spawns:?}");
    let sockets = rule_only_driver_and_api_open_sockets(&files);
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert!(sockets[0].starts_with("src/cli/vm.rs:2"));
}

#[test]
fn tidy_catches_a_long_file_but_not_its_tests() {
    let long = format!("//! x\n{}", "fn f() {}\n".repeat(MAX_LINES));
    let short_with_tests = format!(
        "//! x\nfn f() {{}}\n\n#[cfg(test)]\nmod tests {{\n{}}}\n",
        "fn g() {}\n".repeat(MAX_LINES)
    );
    let files = tree(&[("src/a.rs", &long), ("src/b.rs", &short_with_tests)]);
    let found = rule_short_files(&files);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("src/a.rs"));
}

#[test]
fn tidy_catches_files_that_import_each_other_in_a_loop() {
    let files = tree(&[
        ("src/lib.rs", "//! x\npub mod c;\n"),
        (
            "src/c/mod.rs",
            "//! x\npub mod a;\npub mod b;\npub mod d;\n",
        ),
        ("src/c/a.rs", "//! x\nuse super::b::B;\npub struct A;\n"),
        (
            "src/c/b.rs",
            "//! x\nuse crate::c::{d::D, a::A};\npub struct B;\n",
        ),
        ("src/c/d.rs", "//! x\npub struct D;\n"),
    ]);
    let found = rule_no_import_cycles(&files);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("src/c/a.rs") && found[0].contains("src/c/b.rs"),
        "{found:?}"
    );

    // Downward only: no loop.
    let files = tree(&[
        ("src/lib.rs", "//! x\npub mod c;\n"),
        (
            "src/c/mod.rs",
            "//! x\npub mod a;\npub mod b;\npub use a::A;\n",
        ),
        ("src/c/a.rs", "//! x\nuse super::b::B;\npub struct A(B);\n"),
        (
            "src/c/b.rs",
            "//! x\npub struct B;\nfn f() -> crate::c::b::B { B }\n",
        ),
    ]);
    assert_none("no import cycles", rule_no_import_cycles(&files));

    // Through a facade: a child naming its parent's re-export is a loop.
    let files = tree(&[
        ("src/lib.rs", "//! x\npub mod c;\n"),
        (
            "src/c/mod.rs",
            "//! x\npub mod a;\npub mod b;\npub use a::A;\n",
        ),
        ("src/c/b.rs", "//! x\npub fn f() -> super::A { todo() }\n"),
        (
            "src/c/a.rs",
            "//! x\npub struct A;\nfn g() { crate::c::b::f(); }\n",
        ),
    ]);
    assert_eq!(rule_no_import_cycles(&files).len(), 1);
}

#[test]
fn tidy_catches_a_file_without_its_paragraph_and_an_unlisted_folder() {
    let texts = vec![
        (
            "src/a.rs".to_owned(),
            "//! What a is.\nfn f() {}\n".to_owned(),
        ),
        ("src/b.rs".to_owned(), "use x;\n".to_owned()),
    ];
    assert_eq!(rule_files_say_what_they_are(&texts).len(), 1);
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("src/listed")).expect("mkdir");
    std::fs::create_dir_all(root.path().join("src/unlisted")).expect("mkdir");
    let found = rule_code_map_lists_every_folder(root.path(), "| `src/` | | `src/listed/` |");
    assert_eq!(
        found,
        ["ARCHITECTURE.md's code map does not list src/unlisted/"]
    );
}

//! Property tests: no input makes parsing or validation panic or hang.
//!
//! Random bytes, random YAML punctuation, and random mutations of the shipped
//! example files (bit flips, deletions, insertions of YAML punctuation,
//! duplicated and swapped lines, truncation) go through `parse_file` and
//! `assemble`. Each case must finish within 2 s: a hang guard, not a
//! performance target. Diagnostics must stay inside the file they name.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use converge::spec::assemble;
use converge::spec::parse::{ParsedFile, parse_file};
use proptest::prelude::*;
use proptest::sample::Index;

use crate::support::desired::manifest_dir;

const CASE_LIMIT: Duration = Duration::from_secs(2);

/// An example YAML file.
struct ExampleFile {
    example: &'static str,
    /// Relative to the example's directory.
    path: PathBuf,
    bytes: Vec<u8>,
}

/// Every example YAML file.
fn example_files() -> Vec<ExampleFile> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read examples")
            .map(|e| e.expect("read examples").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let bytes = std::fs::read(&path).expect("read an example");
                let relative = path.strip_prefix(root).expect("under root").to_path_buf();
                out.push((relative, bytes));
            }
        }
    }
    let mut out = Vec::new();
    for example in ["examples/homelab", "examples/quickstart"] {
        let root = manifest_dir().join(example);
        let mut files = Vec::new();
        walk(&root, &root, &mut files);
        out.extend(files.into_iter().map(|(path, bytes)| ExampleFile {
            example,
            path,
            bytes,
        }));
    }
    assert!(out.len() >= 10, "found {} example files", out.len());
    out
}

/// Parses `bytes` as `file`, assembles it together with `others`, and checks
/// what must hold for any input.
fn check(file: &Path, bytes: &[u8], others: &[ParsedFile]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let parsed = parse_file(file, bytes);
    let assembled = assemble(Path::new("/desired"), others.iter().chain([&parsed]));
    let elapsed = started.elapsed();
    prop_assert!(
        elapsed < CASE_LIMIT,
        "parse + assemble took {elapsed:?} on {} bytes",
        bytes.len()
    );
    let lines = u32::try_from(yaml_lines(bytes)).unwrap_or(u32::MAX);
    for d in &parsed.diagnostics {
        prop_assert_eq!(&d.file, file);
        prop_assert!(
            d.line <= lines,
            "diagnostic at line {} of a {}-line file: {}",
            d.line,
            lines,
            d
        );
        prop_assert!(d.is_error(), "parsing yields errors only: {}", d);
    }
    prop_assert_eq!(
        assembled.desired.is_some(),
        assembled.errors().next().is_none()
    );
    // Parsing is deterministic.
    let again = parse_file(file, bytes);
    prop_assert_eq!(again.diagnostics, parsed.diagnostics);
    prop_assert_eq!(again.objects.len(), parsed.objects.len());
    Ok(())
}

/// How many lines YAML sees in `bytes`: a line break is LF, CR LF or a lone CR.
fn yaml_lines(bytes: &[u8]) -> usize {
    let lone_crs = bytes
        .windows(2)
        .filter(|w| w[0] == b'\r' && w[1] != b'\n')
        .count()
        + usize::from(bytes.last() == Some(&b'\r'));
    1 + bytes.iter().filter(|b| **b == b'\n').count() + lone_crs
}

#[test]
fn a_lone_carriage_return_is_a_line_break_for_diagnostics() {
    // Found by `mutated_examples_never_panic_or_hang`: the parser reports the
    // error after `\r` on line 2, which a count of `\n` alone called line 1 of 1.
    assert_eq!(yaml_lines(b"! <<: yaml\r:"), 2);
    check(Path::new("cr.yaml"), b"! <<: yaml\r:", &[]).expect("invariants hold");
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Delete(Index, usize),
    Insert(Index, &'static str),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    Truncate(Index),
}

const PUNCTUATION: &[&str] = &[
    ":", "-", "- ", "---\n", "...\n", "[", "]", "{", "}", ",", "&a ", "*a", "!", "!!str ", "|",
    ">", "'", "\"", "#", "%", "@", "`", "? ", "\t", "\n", "  ", "<<: ", "~", "\\", "\u{feff}",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), 1usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), prop::sample::select(PUNCTUATION))
            .prop_map(|(i, p)| Mutation::Insert(i, p)),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    if len == 0 && !matches!(m, Mutation::Insert(..)) {
        return;
    }
    let lines = |bytes: &[u8]| -> Vec<Vec<u8>> {
        bytes
            .split_inclusive(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    };
    match m {
        Mutation::FlipBit(i, bit) => bytes[i.index(len)] ^= 1 << bit,
        Mutation::Delete(i, n) => {
            let start = i.index(len);
            let end = (start + n).min(len);
            bytes.drain(start..end);
        }
        Mutation::Insert(i, p) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, p.bytes());
        }
        Mutation::DuplicateLine(i) => {
            let mut lines = lines(bytes);
            let at = i.index(lines.len());
            let copy = lines[at].clone();
            lines.insert(at, copy);
            *bytes = lines.concat();
        }
        Mutation::SwapLines(a, b) => {
            let mut lines = lines(bytes);
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
            *bytes = lines.concat();
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(len)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_or_hang(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(Path::new("random.yaml"), &bytes, &[])?;
    }

    #[test]
    fn random_yaml_punctuation_never_panics_or_hangs(
        text in "([-:{}\\[\\],&*!|>'\"%@`#?~ \t\n]|apiVersion|kind|spec|converge/v1|Machine|Service|VirtualMachine|metadata|name|[a-z0-9]){0,300}"
    ) {
        check(Path::new("punct.yaml"), text.as_bytes(), &[])?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn mutated_examples_never_panic_or_hang(
        which in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let files = example_files();
        let target = &files[which.index(files.len())];
        let mut bytes = target.bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        // Assemble with the rest of the same example, so cross-object checks
        // (references, duplicates, roles) see the mutated objects too.
        let others: Vec<ParsedFile> = files
            .iter()
            .filter(|f| f.example == target.example && f.path != target.path)
            .map(|f| parse_file(&f.path, &f.bytes))
            .collect();
        check(&target.path, &bytes, &others)?;
    }
}

#[test]
fn unmutated_examples_parse_without_diagnostics() {
    // The baseline the mutations start from is clean, so the mutation test
    // exercises error paths and not a file that was broken to begin with.
    for file in example_files() {
        let parsed = parse_file(&file.path, &file.bytes);
        assert!(
            parsed.diagnostics.is_empty(),
            "{}/{}: {:?}",
            file.example,
            file.path.display(),
            parsed.diagnostics
        );
        assert!(!parsed.objects.is_empty(), "{}", file.path.display());
    }
}

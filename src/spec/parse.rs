//! Parsing one file: bytes to typed documents, with diagnostics.
//!
//! A file holds any number of YAML documents. It is split at document markers
//! (a `---` or `...` line; YAML forbids those at column 0 inside any scalar,
//! so the split is exact) and every document is parsed on its own, so one bad
//! document does not hide the errors of the next. Each document is read twice:
//! first its `apiVersion` and `kind`, then the whole of it as that kind, with
//! unknown fields, duplicate keys and wrong types reported at their line and
//! column. Parsing is bounded: file size, nesting, node and alias budgets are
//! fixed here, so no input can make it hang or exhaust memory. Pure: no IO.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::at::{At, Loc};
use super::diagnostic::{Diagnostic, Origin, SourceText};
use super::key::Kind;
use super::model::{API_VERSION, Document, MachineSpec, ServiceSpec, VmSpec};
use super::shape;
use super::yaml;

pub use super::yaml::{MAX_DEPTH, MAX_FILE_BYTES};

/// One object as parsed, before cross-object validation.
#[derive(Debug, Clone)]
pub enum ParsedObject {
    Machine(Document<MachineSpec>),
    VirtualMachine(Document<VmSpec>),
    Service(Document<ServiceSpec>),
}

impl ParsedObject {
    pub fn kind(&self) -> Kind {
        match self {
            ParsedObject::Machine(_) => Kind::Machine,
            ParsedObject::VirtualMachine(_) => Kind::VirtualMachine,
            ParsedObject::Service(_) => Kind::Service,
        }
    }

    pub fn name(&self) -> &At<super::names::Name> {
        match self {
            ParsedObject::Machine(d) => &d.metadata.name,
            ParsedObject::VirtualMachine(d) => &d.metadata.name,
            ParsedObject::Service(d) => &d.metadata.name,
        }
    }
}

/// A parsed document and where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub object: ParsedObject,
    pub origin: Origin,
}

/// Everything one file yielded.
#[derive(Debug, Clone, Default)]
pub struct ParsedFile {
    pub objects: Vec<Located>,
    pub diagnostics: Vec<Diagnostic>,
}

/// `apiVersion` and `kind`, read before the rest; other fields are ignored here.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<At<String>>,
    kind: Option<At<String>>,
}

/// Parses the bytes of `file` (a path relative to the desired-state directory).
pub fn parse_file(file: &Path, bytes: &[u8]) -> ParsedFile {
    let file: Arc<Path> = Arc::from(file);
    let whole_file = |message: String| {
        let origin = Origin::new(file.clone(), Arc::default(), 0);
        let mut d = origin.error(Loc::UNKNOWN, message);
        d.line = 0;
        d.column = 0;
        ParsedFile {
            objects: Vec::new(),
            diagnostics: vec![d],
        }
    };
    if bytes.len() > MAX_FILE_BYTES {
        return oversized_file(&file, bytes.len() as u64);
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
            let column = 1 + valid.iter().rev().take_while(|b| **b != b'\n').count();
            let mut parsed = whole_file(
                "file is not UTF-8 text: save it as UTF-8 (is it a binary file in the desired-state directory?)".to_owned(),
            );
            parsed.diagnostics[0].line = u32::try_from(line).unwrap_or(u32::MAX);
            parsed.diagnostics[0].column = u32::try_from(column).unwrap_or(u32::MAX);
            return parsed;
        }
    };
    if let Some(pos) = text.find('\0') {
        let line = 1 + text[..pos].matches('\n').count();
        let mut parsed =
            whole_file("file contains a NUL byte: it is not a YAML text file".to_owned());
        parsed.diagnostics[0].line = u32::try_from(line).unwrap_or(u32::MAX);
        parsed.diagnostics[0].column = 1;
        return parsed;
    }
    let shared_text = Arc::new(SourceText::new(text));
    let mut parsed = ParsedFile::default();
    for (line_offset, doc) in split_documents(text) {
        let origin = Origin::new(file.clone(), shared_text.clone(), line_offset);
        match parse_document(&doc, &origin) {
            Ok(Some(object)) => parsed.objects.push(Located { object, origin }),
            Ok(None) => {}
            Err(diagnostics) => parsed.diagnostics.extend(diagnostics),
        }
    }
    parsed
}

/// What a file of `len` bytes, over [`MAX_FILE_BYTES`], yields: one error
/// about the whole file. The reader calls it from the file's size alone, so
/// an oversized file is never read.
pub fn oversized_file(file: &Path, len: u64) -> ParsedFile {
    let origin = Origin::new(Arc::from(file), Arc::default(), 0);
    let mut d = origin.error(
        Loc::UNKNOWN,
        format!(
            "file is {len} bytes, more than the limit of {MAX_FILE_BYTES} bytes: split it into several files"
        ),
    );
    d.line = 0;
    d.column = 0;
    ParsedFile {
        objects: Vec::new(),
        diagnostics: vec![d],
    }
}

/// Splits a stream into documents: `(lines before the document, its text)`.
/// Marker lines become blank lines (or keep content after `--- ` in place),
/// so line and column numbers inside a document stay those of the file
/// minus the offset.
fn split_documents(text: &str) -> Vec<(u32, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start: u32 = 0;
    let mut in_document_end = false;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = |m: &str| {
            bare == m || bare.starts_with(&format!("{m} ")) || bare.starts_with(&format!("{m}\t"))
        };
        if is_marker("---") {
            docs.push((start, std::mem::take(&mut current)));
            start = index;
            in_document_end = false;
            // Keep what follows the marker at its column, on the document's first line.
            current.push_str("   ");
            current.push_str(&line[3..]);
            continue;
        }
        if is_marker("...") {
            docs.push((start, std::mem::take(&mut current)));
            start = index + 1;
            in_document_end = true;
            continue;
        }
        if in_document_end {
            // Only comments and directives may follow `...` before the next `---`.
            start = index + 1;
            continue;
        }
        current.push_str(line);
    }
    docs.push((start, current));
    docs.retain(|(_, doc)| has_content(doc));
    docs
}

fn has_content(doc: &str) -> bool {
    doc.lines().any(|l| {
        let t = l.trim();
        // A directive (`%YAML 1.2`) belongs to the `---` after it, not to a document.
        !t.is_empty() && !t.starts_with('#') && !l.starts_with('%')
    })
}

fn parse_document(doc: &str, origin: &Origin) -> Result<Option<ParsedObject>, Vec<Diagnostic>> {
    let one = |d: Diagnostic| vec![d];
    let header: Header = from_doc(doc, origin).map_err(one)?;
    let Some(api_version) = header.api_version else {
        return Err(one(origin.error(
            Loc::new(first_content_line(doc), 1),
            format!("document has no `apiVersion`: add `apiVersion: {API_VERSION}`"),
        )));
    };
    if api_version.value != API_VERSION {
        return Err(one(origin.error(
            api_version.loc,
            format!(
                "unknown apiVersion `{}`: this converge reads `{API_VERSION}`",
                shorten(&api_version.value)
            ),
        )));
    }
    let Some(kind) = header.kind else {
        return Err(one(origin.error(
            Loc::new(first_content_line(doc), 1),
            "document has no `kind`: add `kind: Machine`, `kind: VirtualMachine` or `kind: Service`",
        )));
    };
    let object = match Kind::from_yaml_name(&kind.value) {
        Some(k @ Kind::Machine) => ParsedObject::Machine(typed(doc, origin, k)?),
        Some(k @ Kind::VirtualMachine) => ParsedObject::VirtualMachine(typed(doc, origin, k)?),
        Some(k @ Kind::Service) => ParsedObject::Service(typed(doc, origin, k)?),
        None => {
            return Err(one(origin.error(
                kind.loc,
                format!(
                    "unknown kind `{}`: use Machine, VirtualMachine or Service",
                    shorten(&kind.value)
                ),
            )));
        }
    };
    Ok(Some(object))
}

/// Reads a document of `kind` as its type. serde stops at the first error;
/// then `shape` finds the others, and each is reported once: a problem at
/// the place of serde's error is the same one, unless it is a missing field
/// (reported at its mapping's last key, which may be wrong too) that serde
/// did not name.
fn typed<T: DeserializeOwned>(
    doc: &str,
    origin: &Origin,
    kind: Kind,
) -> Result<T, Vec<Diagnostic>> {
    yaml::from_str(doc).map_err(|(first_loc, first)| {
        let mut all = vec![origin.error(first_loc, first.as_str())];
        for problem in shape::problems(doc, kind, first_loc) {
            let said =
                problem.loc == first_loc && (!problem.missing_field || problem.message == first);
            if !said {
                all.push(origin.error(problem.loc, problem.message));
            }
        }
        all
    })
}

fn first_content_line(doc: &str) -> u32 {
    let index = doc
        .lines()
        .position(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .unwrap_or(0);
    u32::try_from(index + 1).unwrap_or(1)
}

fn from_doc<T: DeserializeOwned>(doc: &str, origin: &Origin) -> Result<T, Diagnostic> {
    yaml::from_str(doc).map_err(|(loc, message)| origin.error(loc, message))
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(40).flat_map(char::escape_debug).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_line_numbers_of_every_document() {
        let text = "# header\n---\na: 1\n---\nb: 2\n...\n# trailing\n--- c: 3\n";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].0, 1);
        assert_eq!(docs[0].1, "   \na: 1\n");
        assert_eq!(docs[1].0, 3);
        assert_eq!(docs[2].0, 7);
        assert_eq!(docs[2].1, "    c: 3\n");
    }

    #[test]
    fn markers_inside_indented_text_do_not_split() {
        let text = "a: |\n  ---\n  x\nb: 1\n";
        assert_eq!(split_documents(text).len(), 1);
    }
}

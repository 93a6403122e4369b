//! Diagnostics: what is wrong with the desired state, and where.
//!
//! A diagnostic names a file, a line and a column, quotes the line, and says
//! what to do. Loading collects every diagnostic of a directory in one run
//! rather than stopping at the first, so a user fixes a bad commit in one go.
//! Rendering is plain text (like rustc) or JSON; this module never prints.

use std::borrow::Cow;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use super::at::Loc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// Another place a diagnostic refers to (the first of two duplicates, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Related {
    pub file: PathBuf,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// One problem in the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Relative to the desired-state directory.
    pub file: PathBuf,
    /// 1-based; 0 when the problem is about the whole file.
    pub line: u32,
    pub column: u32,
    /// What is wrong and what to do; characters that could steer a
    /// terminal are escaped ([`escape_text`]).
    pub message: String,
    /// The source line quoted under the message, shortened and escaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_line: Option<String>,
    /// How many characters of `source_line` come before the caret: the
    /// column, counted in the escaped text.
    #[serde(skip)]
    pub caret: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<Related>,
}

impl Diagnostic {
    /// A diagnostic about a whole file (or the directory: `file` `.`), with
    /// no line to quote.
    pub fn about_file(severity: Severity, file: PathBuf, message: &str) -> Diagnostic {
        Diagnostic {
            severity,
            file,
            line: 0,
            column: 0,
            message: escape_text(message).into_owned(),
            source_line: None,
            caret: 0,
            related: Vec::new(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The text of one file, shared by the origins of all its documents. Where
/// each line starts is found once, when the first diagnostic quotes a line,
/// so quoting is constant time per diagnostic: a file with many errors is
/// reported in linear time, and a valid file never pays for the index.
#[derive(Debug, Default)]
pub struct SourceText {
    text: Box<str>,
    line_starts: OnceLock<Vec<usize>>,
}

impl SourceText {
    pub fn new(text: &str) -> SourceText {
        SourceText {
            text: text.into(),
            line_starts: OnceLock::new(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The 1-based `line`, without its line break; as `str::lines` yields it.
    fn line(&self, line: u32) -> Option<&str> {
        let index = usize::try_from(line).ok()?.checked_sub(1)?;
        let starts = self.line_starts.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        let start = *starts.get(index)?;
        if start >= self.text.len() {
            return None;
        }
        let end = starts
            .get(index + 1)
            .map_or(self.text.len(), |next| next - 1);
        let raw = &self.text[start..end];
        Some(raw.strip_suffix('\r').unwrap_or(raw))
    }
}

impl PartialEq for SourceText {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// Where a document sits in its file; turns document-relative locations
/// into file positions and quotes source lines.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<Path>,
    text: Arc<SourceText>,
    /// Lines of the file before the document's first line.
    line_offset: u32,
}

impl Origin {
    pub(crate) fn new(file: Arc<Path>, text: Arc<SourceText>, line_offset: u32) -> Origin {
        Origin {
            file,
            text,
            line_offset,
        }
    }

    /// Whether both origins are the same document of the same file text: then
    /// everything read from them, values and locations, is the same too
    /// (parsing is deterministic), so every diagnostic about them is.
    pub(crate) fn is_same_document(&self, other: &Origin) -> bool {
        self.line_offset == other.line_offset
            && self.file == other.file
            && (Arc::ptr_eq(&self.text, &other.text) || self.text == other.text)
    }

    /// The file position of a document-relative location.
    pub fn position(&self, loc: Loc) -> (u32, u32) {
        if loc.is_known() {
            (loc.line.saturating_add(self.line_offset), loc.column)
        } else {
            (self.line_offset.saturating_add(1), 1)
        }
    }

    /// `file:line:column` of a location, for messages that point elsewhere.
    pub fn describe(&self, loc: Loc) -> String {
        let (line, column) = self.position(loc);
        format!("{}:{line}:{column}", self.file.display())
    }

    pub fn diagnostic(
        &self,
        severity: Severity,
        loc: Loc,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = self.position(loc);
        let (source_line, caret) = match quote_line(&self.text, line, column) {
            Some((quoted, caret)) => (Some(quoted), caret),
            None => (None, 0),
        };
        Diagnostic {
            severity,
            file: self.file.to_path_buf(),
            line,
            column,
            message: escape_text(&message.into()).into_owned(),
            source_line,
            caret,
            related: Vec::new(),
        }
    }

    pub fn error(&self, loc: Loc, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, loc, message)
    }

    pub fn warning(&self, loc: Loc, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Warning, loc, message)
    }

    pub fn related(&self, loc: Loc, message: impl Into<String>) -> Related {
        let (line, column) = self.position(loc);
        Related {
            file: self.file.to_path_buf(),
            line,
            column,
            message: escape_text(&message.into()).into_owned(),
        }
    }
}

impl Diagnostic {
    pub fn with_related(mut self, related: Related) -> Diagnostic {
        self.related.push(related);
        self
    }
}

/// The most characters of a line quoted under a diagnostic.
const QUOTE_CHARS: usize = 160;

/// The 1-based `line` of `text`, shortened and escaped for display, and how
/// many of its characters come before the 1-based `column`.
fn quote_line(text: &SourceText, line: u32, column: u32) -> Option<(String, u32)> {
    let raw = text.line(line)?;
    let before = usize::try_from(column.saturating_sub(1)).unwrap_or(usize::MAX);
    let mut quoted = String::new();
    let mut caret = 0;
    for (i, c) in raw.chars().take(QUOTE_CHARS).enumerate() {
        let start = quoted.len();
        if is_unsafe_to_print(c) {
            quoted.extend(c.escape_unicode());
        } else {
            quoted.push(c);
        }
        if i < before {
            caret += quoted[start..].chars().count();
        }
    }
    if raw.chars().nth(QUOTE_CHARS).is_some() {
        quoted.push('…');
    }
    Some((quoted, u32::try_from(caret).unwrap_or(u32::MAX)))
}

/// Whether printing `c` could steer a terminal or reorder what is shown:
/// control characters (but tab, which YAML allows in text) and Unicode's
/// bidirectional embeddings, overrides and isolates.
fn is_unsafe_to_print(c: char) -> bool {
    (c.is_control() && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` made safe to print: each character that could steer a terminal
/// is shown escaped, like `\u{1b}`; everything else, UTF-8 included, is kept.
pub fn escape_text(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_to_print) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe_to_print(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A path as text safe to print: its UTF-8 parts as [`escape_text`] shows
/// them, and each byte that is not UTF-8 as `\xNN`.
pub fn escape_path(path: &Path) -> String {
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        out.push_str(&escape_text(chunk.valid()));
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        // Escaped again here, for diagnostics built field by field; the
        // escape leaves escaped text as it is.
        writeln!(f, "{label}: {}", escape_text(&self.message))?;
        let file = escape_path(&self.file);
        if self.line == 0 {
            writeln!(f, "  --> {file}")?;
        } else {
            writeln!(f, "  --> {file}:{}:{}", self.line, self.column)?;
        }
        if let Some(source) = &self.source_line {
            let number = self.line.to_string();
            let pad = " ".repeat(number.len());
            writeln!(f, " {pad} |")?;
            writeln!(f, " {number} | {}", escape_text(source))?;
            let caret_at = usize::try_from(self.caret).unwrap_or(0);
            let indent: String = source
                .chars()
                .take(caret_at)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            writeln!(f, " {pad} | {indent}^")?;
        }
        for related in &self.related {
            writeln!(
                f,
                "  = note: {} at {}:{}:{}",
                escape_text(&related.message),
                escape_path(&related.file),
                related.line,
                related.column
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexed_lines_are_the_lines_str_lines_yields() {
        for text in [
            "",
            "\n",
            "a",
            "a\n",
            "a\r\nb\r\n\r\nc",
            "a\n\nb\n\n",
            "é\rx\n\t\n",
        ] {
            let indexed = SourceText::new(text);
            let expected: Vec<&str> = text.lines().collect();
            let got: Vec<&str> = (1..).map_while(|n| indexed.line(n)).collect();
            assert_eq!(got, expected, "{text:?}");
            assert_eq!(indexed.line(0), None);
        }
    }

    #[test]
    fn a_long_line_is_quoted_shortened() {
        let text = SourceText::new(&format!("{}\nb\n", "x".repeat(10_000)));
        let (quoted, caret) = quote_line(&text, 1, 5_000).unwrap();
        assert_eq!(quoted.chars().count(), 161);
        assert!(quoted.ends_with('…'));
        assert_eq!(
            caret, 160,
            "a column past the quote puts the caret at its end"
        );
        assert_eq!(quote_line(&text, 2, 1), Some(("b".to_owned(), 0)));
        assert_eq!(quote_line(&text, 3, 1), None);
    }

    #[test]
    fn escaping_keeps_text_and_utf8_and_escapes_what_steers_a_terminal() {
        let ordinary = "web-1: café 日本 🦀 \t\"quoted\" \\path\\ \u{feff}";
        assert!(matches!(escape_text(ordinary), Cow::Borrowed(_)));
        assert_eq!(
            escape_text("a\u{1b}[31mb\rc\u{7f}d\u{9b}e\u{202e}f\u{2066}g\n"),
            "a\\u{1b}[31mb\\u{d}c\\u{7f}d\\u{9b}e\\u{202e}f\\u{2066}g\\u{a}"
        );
        let escaped = escape_text("\u{1b}").into_owned();
        assert_eq!(
            escape_text(&escaped),
            escaped,
            "escaping twice changes nothing"
        );
        assert_eq!(
            escape_path(Path::new(std::ffi::OsStr::from_bytes(
                b"d/caf\xe9\x1b.yaml"
            ))),
            "d/caf\\xe9\\u{1b}.yaml"
        );
    }

    #[test]
    fn a_rendered_diagnostic_has_no_control_character_and_its_caret_under_its_column() {
        let text = "a: \"\u{1b}[2J\"\n\u{1b}]0;x\u{7}\tkey: v\n";
        let origin = Origin::new(
            Arc::from(Path::new("m\u{1b}.yaml")),
            Arc::new(SourceText::new(text)),
            0,
        );
        // Column 8 of line 2 is the `k` of `key`, after ESC ] 0 ; x BEL TAB.
        let d = origin
            .error(Loc::new(2, 8), "unknown field `\u{1b}]0;x`")
            .with_related(origin.related(Loc::new(1, 1), "see \u{9b}"));
        let rendered = d.to_string();
        assert!(
            !rendered
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{rendered:?}"
        );
        let expected = [
            "error: unknown field `\\u{1b}]0;x`",
            "  --> m\\u{1b}.yaml:2:8",
            "   |",
            " 2 | \\u{1b}]0;x\\u{7}\tkey: v",
            // Under the 15 characters `\u{1b}]0;x\u{7}` shows, and the tab.
            &format!("   | {}\t^", " ".repeat(15)),
            "  = note: see \\u{9b} at m\\u{1b}.yaml:1:1",
            "",
        ]
        .join("\n");
        assert_eq!(rendered, expected);
    }
}

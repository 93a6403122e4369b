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
    pub message: String,
    /// The source line quoted under the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_line: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<Related>,
}

impl Diagnostic {
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
        Diagnostic {
            severity,
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
            source_line: quote_line(&self.text, line),
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
            message: message.into(),
        }
    }
}

impl Diagnostic {
    pub fn with_related(mut self, related: Related) -> Diagnostic {
        self.related.push(related);
        self
    }
}

/// The 1-based `line` of `text`, shortened for display.
fn quote_line(text: &SourceText, line: u32) -> Option<String> {
    let raw = text.line(line)?;
    let mut quoted: String = raw.chars().take(160).collect();
    if raw.chars().nth(160).is_some() {
        quoted.push('…');
    }
    Some(quoted)
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
        writeln!(f, "{label}: {}", self.message)?;
        if self.line == 0 {
            writeln!(f, "  --> {}", self.file.display())?;
        } else {
            writeln!(
                f,
                "  --> {}:{}:{}",
                self.file.display(),
                self.line,
                self.column
            )?;
        }
        if let Some(source) = &self.source_line {
            let number = self.line.to_string();
            let pad = " ".repeat(number.len());
            writeln!(f, " {pad} |")?;
            writeln!(f, " {number} | {source}")?;
            let caret_at = usize::try_from(self.column.saturating_sub(1)).unwrap_or(0);
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
                related.message,
                related.file.display(),
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
        let quoted = quote_line(&text, 1).unwrap();
        assert_eq!(quoted.chars().count(), 161);
        assert!(quoted.ends_with('…'));
        assert_eq!(quote_line(&text, 2).as_deref(), Some("b"));
        assert_eq!(quote_line(&text, 3), None);
    }
}

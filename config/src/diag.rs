//! Problems found in a config file, each with the place in the file it is
//! about, rendered as `FILE:LINE:COL: message`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Byte range in the file of the key or value at fault.
    pub span: Range<usize>,
    /// 1-based line of the span's start.
    pub line: usize,
    /// 1-based column (in characters) of the span's start.
    pub column: usize,
    /// What is wrong and what would be accepted.
    pub message: String,
}

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file was read and has one or more problems, all of them listed.
    #[error("{}", render(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
    /// Neither the command line nor `[edge].location` says where this edge is.
    #[error("{}: no edge location: pass --location ID or set [edge].location", path.display())]
    NoLocation {
        /// The file.
        path: PathBuf,
    },
    /// The edge location asked for on the command line is not in the file.
    #[error("--location {given:?} is not a location of {}; known locations: {known}", path.display())]
    UnknownLocation {
        /// The file.
        path: PathBuf,
        /// The id given.
        given: String,
        /// The ids the file defines, comma-separated.
        known: String,
    },
}

impl ConfigError {
    /// Each problem as its own `FILE:LINE:COL: message` line (one line for
    /// errors that are not about a place in the file).
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { path, problems } => {
                problems.iter().map(|p| format!("{}:{}:{}: {}", path.display(), p.line, p.column, p.message)).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{}:{}:{}: {}", path.display(), p.line, p.column, p.message));
    }
    out
}

/// Collects problems while a file is decoded and validated, so that every
/// problem is reported, not just the first.
#[derive(Debug, Default)]
pub(crate) struct Diagnostics {
    found: Vec<(Range<usize>, String)>,
}

impl Diagnostics {
    /// Record a problem at `span`.
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl fmt::Display) {
        self.found.push((span, message.to_string()));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Resolve spans to lines and columns, in file order.
    pub(crate) fn into_problems(self, text: &str) -> Vec<Problem> {
        let index = LineIndex::new(text);
        let mut problems: Vec<Problem> = self
            .found
            .into_iter()
            .map(|(span, message)| {
                let start = span.start.min(text.len());
                let (line, column) = index.locate(text, start);
                Problem { span, line, column, message }
            })
            .collect();
        problems.sort_by_key(|p| (p.span.start, p.span.end));
        problems.dedup();
        problems
    }
}

/// Byte offsets of line starts, to turn a byte offset into line and column.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    fn locate(&self, text: &str, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        // Columns count characters; the offset may sit inside a multi-byte
        // character if a span was computed loosely, so floor it.
        let mut end = offset;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let column = text[start..end].chars().count() + 1;
        (line, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = 2\n";
        let mut d = Diagnostics::default();
        d.error(0..1, "first");
        d.error(10..11, "second"); // the '=' after "bé " (é is 2 bytes)
        d.error(6..8, "third");
        let p = d.into_problems(text);
        assert_eq!((p[0].line, p[0].column), (1, 1));
        assert_eq!((p[1].line, p[1].column, p[1].message.as_str()), (2, 1, "third"));
        assert_eq!((p[2].line, p[2].column), (2, 4));
    }

    #[test]
    fn rendering_is_file_line_col_message() {
        let err = ConfigError::Invalid {
            path: PathBuf::from("stoke.toml"),
            problems: vec![Problem { span: 0..1, line: 3, column: 7, message: "bad".into() }],
        };
        assert_eq!(err.to_string(), "stoke.toml:3:7: bad");
        assert_eq!(err.lines(), vec!["stoke.toml:3:7: bad".to_owned()]);
    }
}

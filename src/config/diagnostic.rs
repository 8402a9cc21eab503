//! Where config problems are reported: [`Diagnostic`] (`file:line:col:
//! message`), [`ConfigErrors`], a file's [`Source`] text with its line
//! index, and serde's errors turned into located messages with a "did you
//! mean" for misspelt keys.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One located problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// Shared by every diagnostic (and domain origin) of one file.
    pub file: Arc<Path>,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Where something is defined: a file, line and column (a diagnostic
/// without a message, kept in every domain's config, so a third of the
/// size of a [`Diagnostic`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: Arc<Path>,
    pub line: u32,
    pub col: u32,
}

impl Origin {
    /// A diagnostic at this place.
    pub fn diagnostic(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: Arc::clone(&self.file),
            line: self.line as usize,
            col: self.col as usize,
            message: message.into(),
        }
    }
}

impl From<&Diagnostic> for Origin {
    fn from(d: &Diagnostic) -> Origin {
        Origin {
            file: Arc::clone(&d.file),
            line: u32::try_from(d.line).unwrap_or(u32::MAX),
            col: u32::try_from(d.col).unwrap_or(u32::MAX),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every error found in a config, plus the warnings seen on the way.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{n} config error{}", if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n{e}")?;
        }
        Ok(())
    }
}

/// The text of one config file and how to report positions in it.
pub(super) struct Source {
    pub(super) path: Arc<Path>,
    /// Relative paths inside the file are resolved against this directory.
    pub(super) base: PathBuf,
    pub(super) text: String,
    pub(super) line_starts: Vec<usize>,
}

impl Source {
    pub(super) fn at(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = line_col(&self.text, &self.line_starts, span.start);
        Diagnostic {
            file: self.path.clone(),
            line,
            col,
            message: message.into(),
        }
    }

    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }
}

/// Byte offsets at which lines start, so positions are found by binary
/// search: a 100,000-domain file needs 100,000 positions, and scanning from
/// the start for each would be quadratic.
pub(super) fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, starts: &[usize], offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let line = starts.partition_point(|&s| s <= offset).max(1);
    let start = starts.get(line - 1).copied().unwrap_or(0);
    let col = text.get(start..offset).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Collects diagnostics while validating.
#[derive(Default)]
pub(super) struct Report {
    pub(super) errors: Vec<Diagnostic>,
    pub(super) warnings: Vec<Diagnostic>,
}

/// Turns a TOML/serde error into a located diagnostic, with a "did you mean"
/// for misspelt keys.
pub(super) fn toml_error(source: &Source, e: &toml::de::Error) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let mut message = e.message().trim().to_owned();
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    source.at(span, message)
}

/// serde's unknown-field message is "unknown field `x`, expected one of `a`, `b`".
pub(super) fn did_you_mean(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (strsim::damerau_levenshtein(unknown, cand), cand))
        .filter(|(dist, cand)| *dist <= 2.max(cand.len() / 4) && *dist < cand.len())
        .min_by_key(|(dist, _)| *dist)
        .map(|(_, cand)| cand.to_owned())
}

//! One error type for every configuration problem: file, place, what is wrong,
//! what to do; and [`ConfigErrors`], every problem of a file, collected by
//! [`Errors`] while [`doc`] reads it.

pub mod doc;
pub mod suggest;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A problem in a configuration file, rendered as
/// `path:line:col: what is wrong; what to do`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, where the problem has a place in the file.
    pub place: Option<(usize, usize)>,
    pub message: String,
    pub hint: String,
}

impl ConfigError {
    pub fn new(file: &Path, message: impl Into<String>, hint: impl Into<String>) -> Self {
        ConfigError { file: file.to_path_buf(), place: None, message: message.into(), hint: hint.into() }
    }

    /// Attach the place of a byte span of `text` (the file's contents).
    pub fn at(mut self, text: &str, span: Option<std::ops::Range<usize>>) -> Self {
        if let Some(span) = span {
            self.place = Some(line_col(text, span.start));
        }
        self
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let col = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, col)
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.place {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": {}", self.message)?;
        if !self.hint.is_empty() {
            write!(f, "; {}", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a file (never none), in the order of their places
/// in it; shown one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl std::ops::Deref for ConfigErrors {
    type Target = [ConfigError];

    fn deref(&self) -> &[ConfigError] {
        &self.0
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects the problems of one file while it is read: a check that fails
/// pushes its error and reading goes on (with a placeholder value), so one
/// pass finds them all.
#[derive(Debug)]
pub struct Errors<'a> {
    file: &'a Path,
    text: &'a str,
    list: Vec<ConfigError>,
}

impl<'a> Errors<'a> {
    /// For the file at `file` whose contents are `text`.
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Errors { file, text, list: Vec::new() }
    }

    /// The file's contents.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// A problem at a byte span of the text (`None`: the whole file).
    pub fn at(&mut self, span: Option<Range<usize>>, message: impl Into<String>, hint: impl Into<String>) {
        self.list.push(ConfigError::new(self.file, message, hint).at(self.text, span));
    }

    /// A problem made elsewhere (for this file).
    pub fn push(&mut self, e: ConfigError) {
        self.list.push(e);
    }

    /// `value` if nothing was wrong, else every problem, in the order of
    /// their places in the file (those without a place last), each once.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.list.is_empty() {
            return Ok(value);
        }
        let mut list = self.list;
        list.sort_by_key(|e| (e.place.is_none(), e.place));
        let mut seen = Vec::with_capacity(list.len());
        list.retain(|e| {
            let new = !seen.contains(e);
            if new {
                seen.push(e.clone());
            }
            new
        });
        Err(ConfigErrors(list))
    }
}

/// Turn a `toml` syntax error into a [`ConfigError`] with its place (on one line).
pub fn from_toml(file: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    let hint = if message.starts_with("duplicate key") { "keep only one of them" } else { "fix the TOML syntax" };
    ConfigError::new(file, message, hint).at(text, err.span())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 8), (2, 3));
    }

    #[test]
    fn errors_come_in_file_order_each_once_one_per_line() {
        let text = "a = 1\nb = 2\n";
        let mut errs = Errors::new(Path::new("f.toml"), text);
        errs.at(Some(6..7), "second", "");
        errs.at(None, "no place", "");
        errs.at(Some(0..1), "first", "fix it");
        errs.at(Some(6..7), "second", "");
        let e = errs.finish(()).unwrap_err();
        assert_eq!(e.len(), 3);
        assert_eq!(e.to_string(), "f.toml:1:1: first; fix it\nf.toml:2:1: second\nf.toml: no place");
        assert_eq!(Errors::new(Path::new("f.toml"), text).finish(7), Ok(7));
    }

    #[test]
    fn display_names_file_place_and_hint() {
        let e = ConfigError::new(Path::new("/x/a.toml"), "bad port", "use 1-65535").at("\nport = 0", Some(1..5));
        assert_eq!(e.to_string(), "/x/a.toml:2:1: bad port; use 1-65535");
    }
}

//! One error type for every configuration problem: file, place, what is wrong, what to do.

use std::fmt;
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

/// Turn a `toml` parse/deserialize error into a [`ConfigError`] with its place.
pub fn from_toml(file: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim().to_string();
    let hint = if message.contains("duration") {
        "write a positive Go-style duration such as \"500ms\", \"15s\" or \"1m\""
    } else if message.starts_with("unknown field") {
        "remove it or fix its spelling (see the configuration reference in README.md)"
    } else if message.starts_with("missing field") {
        "add it"
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        "give a value of the expected type"
    } else {
        "fix the TOML syntax"
    };
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
    fn display_names_file_place_and_hint() {
        let e = ConfigError::new(Path::new("/x/a.toml"), "bad port", "use 1-65535").at("\nport = 0", Some(1..5));
        assert_eq!(e.to_string(), "/x/a.toml:2:1: bad port; use 1-65535");
    }
}

//! Permissive access to the raw TOML tree.
//!
//! Validation does not deserialize into serde structs: serde stops at the
//! first type error or unknown field, and the whole point is to report every
//! problem in one pass. Instead it walks the parsed `toml::Table` through
//! [`Section`], whose getters record each problem (with its field path) in a
//! shared [`Problems`] list and return `None`, so the caller falls back to a
//! default and keeps going.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use super::duration::{format_duration, format_size, parse_duration, parse_size};
use super::validate::FieldError;

/// The problems found so far. Interior mutability lets many [`Section`]s
/// (nested, alive at once) share one list without threading `&mut` around.
#[derive(Debug, Default)]
pub(crate) struct Problems(RefCell<Vec<FieldError>>);

impl Problems {
    /// Record a problem at `path`.
    pub(crate) fn add(&self, path: impl Into<String>, message: impl Into<String>) {
        self.0.borrow_mut().push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// All recorded problems, in the order they were found.
    pub(crate) fn into_vec(self) -> Vec<FieldError> {
        self.0.into_inner()
    }
}

/// One table of the config (possibly absent) plus its path, e.g.
/// `upstreams[1]`. Absent sections answer `None` to every getter, which
/// makes "section missing" and "key missing" the same case for callers.
#[derive(Debug, Clone)]
pub(crate) struct Section<'a> {
    table: Option<&'a Table>,
    path: String,
    problems: &'a Problems,
}

impl<'a> Section<'a> {
    /// The document root (its keys have no path prefix).
    pub(crate) fn root(table: &'a Table, problems: &'a Problems) -> Self {
        Section {
            table: Some(table),
            path: String::new(),
            problems,
        }
    }

    /// Whether the table exists in the file.
    pub(crate) fn is_present(&self) -> bool {
        self.table.is_some()
    }

    /// This section's path, e.g. `registry[0]`.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The path of `key` inside this section, e.g. `service.name`.
    pub(crate) fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Whether `key` is set (to anything).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.raw(key).is_some()
    }

    /// The untyped value of `key`.
    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.table.and_then(|t| t.get(key))
    }

    /// Record a problem with `key`.
    pub(crate) fn error(&self, key: &str, message: impl Into<String>) {
        self.problems.add(self.field_path(key), message);
    }

    /// Record `missing (required)` if `key` is not set.
    pub(crate) fn require(&self, key: &str) {
        if !self.has(key) {
            self.error(key, "missing (required)");
        }
    }

    /// Report every key not in `known`, suggesting a close match: a typo
    /// must not silently fall back to a default.
    pub(crate) fn deny_unknown(&self, known: &[&str]) {
        let Some(table) = self.table else { return };
        for key in table.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let message = match closest(key, known) {
                Some(close) => format!("unknown field (did you mean {close:?}?)"),
                None => "unknown field".to_owned(),
            };
            self.error(key, message);
        }
    }

    /// The sub-table `key` (absent if unset or not a table).
    pub(crate) fn table(&self, key: &str) -> Section<'a> {
        let path = self.field_path(key);
        let table = match self.raw(key) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                let message = format!("expected a table, got {}", describe(other));
                self.problems.add(path.clone(), message);
                None
            }
        };
        Section {
            table,
            path,
            problems: self.problems,
        }
    }

    /// The array of tables `[[key]]`, element paths `key[i]`. With
    /// `allow_single`, a plain `[key]` table counts as a one-element list
    /// whose path stays `key`. `None` if unset or of the wrong type.
    pub(crate) fn tables(&self, key: &str, allow_single: bool) -> Option<Vec<Section<'a>>> {
        let path = self.field_path(key);
        match self.raw(key)? {
            Value::Table(t) if allow_single => Some(vec![Section {
                table: Some(t),
                path,
                problems: self.problems,
            }]),
            Value::Array(items) => {
                let mut sections = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    match item {
                        Value::Table(t) => sections.push(Section {
                            table: Some(t),
                            path: item_path,
                            problems: self.problems,
                        }),
                        other => self.problems.add(
                            item_path,
                            format!("expected a table, got {}", describe(other)),
                        ),
                    }
                }
                Some(sections)
            }
            other => {
                let expected = if allow_single {
                    format!("a table ([{key}]) or an array of tables ([[{key}]])")
                } else {
                    format!("an array of tables ([[{key}]])")
                };
                let message = format!("expected {expected}, got {}", describe(other));
                self.problems.add(path, message);
                None
            }
        }
    }

    /// A string run through `parse`, whose error message is recorded as is.
    /// A non-string is reported as `expected <expected>, got <value>`.
    pub(crate) fn parse<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match self.raw(key)? {
            Value::String(s) => parse(s).map_err(|message| self.error(key, message)).ok(),
            other => {
                self.error(key, format!("expected {expected}, got {}", describe(other)));
                None
            }
        }
    }

    /// Any string.
    pub(crate) fn string(&self, key: &str) -> Option<String> {
        self.parse(key, "a string", |s| Ok(s.to_owned()))
    }

    /// A non-empty file system path, kept as given (relative stays relative).
    pub(crate) fn path_buf(&self, key: &str) -> Option<PathBuf> {
        self.parse(key, "a path string", |s| {
            if s.is_empty() {
                Err("must not be empty".to_owned())
            } else {
                Ok(PathBuf::from(s))
            }
        })
    }

    /// A boolean.
    pub(crate) fn bool(&self, key: &str) -> Option<bool> {
        match self.raw(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.error(
                    key,
                    format!("expected true or false, got {}", describe(other)),
                );
                None
            }
        }
    }

    /// An integer in `min..=max`, converted to `T` (the range must fit `T`).
    pub(crate) fn int<T: TryFrom<i64>>(&self, key: &str, min: i64, max: i64) -> Option<T> {
        let value = self.raw(key)?;
        let n = match value {
            Value::Integer(n) if (min..=max).contains(n) => T::try_from(*n).ok(),
            _ => None,
        };
        if n.is_none() {
            // "1..=4294967295" is noise unless the value really is too big.
            let too_big = matches!(value, Value::Integer(n) if *n > max);
            let range = if max >= i64::from(u32::MAX) && !too_big {
                format!(">= {min}")
            } else {
                format!("{min}..={max}")
            };
            self.error(
                key,
                format!("expected an integer {range}, got {}", describe(value)),
            );
        }
        n
    }

    /// A duration string such as `"5s"`.
    pub(crate) fn duration(&self, key: &str) -> Option<Duration> {
        self.parse(key, r#"a duration like "5s""#, parse_duration)
    }

    /// A duration of at least `min`.
    pub(crate) fn duration_at_least(&self, key: &str, min: Duration) -> Option<Duration> {
        let d = self.duration(key)?;
        if d < min {
            let message = format!(
                "must be at least {}, got {}",
                format_duration(min),
                format_duration(d)
            );
            self.error(key, message);
            return None;
        }
        Some(d)
    }

    /// A duration greater than zero (for deadlines and tickers, where zero
    /// would fail every request or spin).
    pub(crate) fn positive_duration(&self, key: &str) -> Option<Duration> {
        let d = self.duration(key)?;
        if d.is_zero() {
            self.error(key, "must be greater than 0s");
            return None;
        }
        Some(d)
    }

    /// A byte size in `min..=max`: an integer or a string like `"64KiB"`.
    pub(crate) fn size(&self, key: &str, min: u64, max: u64) -> Option<u64> {
        let parsed = match self.raw(key)? {
            Value::String(s) => parse_size(s),
            Value::Integer(n) => u64::try_from(*n).map_err(|_| format!("{n} is not a size")),
            other => Err(format!(
                r#"expected a size (bytes, or like "64KiB"), got {}"#,
                describe(other)
            )),
        };
        match parsed {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(n) => {
                let message = format!(
                    "must be between {} and {}, got {}",
                    format_size(min),
                    format_size(max),
                    format_size(n)
                );
                self.error(key, message);
                None
            }
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    /// An array of strings, each passed through `check`; problems are
    /// reported per element (`tags[2]`). `None` if any element is bad.
    pub(crate) fn strings(
        &self,
        key: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Option<Vec<String>> {
        let items = match self.raw(key)? {
            Value::Array(items) => items,
            other => {
                let message = format!("expected an array of strings, got {}", describe(other));
                self.error(key, message);
                return None;
            }
        };
        let path = self.field_path(key);
        let mut out = Vec::with_capacity(items.len());
        let mut all_ok = true;
        for (i, item) in items.iter().enumerate() {
            let problem = match item {
                Value::String(s) => check(s).map(|()| out.push(s.clone())).err(),
                other => Some(format!("expected a string, got {}", describe(other))),
            };
            if let Some(message) = problem {
                self.problems.add(format!("{path}[{i}]"), message);
                all_ok = false;
            }
        }
        all_ok.then_some(out)
    }

    /// A table of string values (`metadata = { k = "v" }`).
    pub(crate) fn string_map(&self, key: &str) -> Option<BTreeMap<String, String>> {
        let entries = match self.raw(key)? {
            Value::Table(t) => t,
            other => {
                let message = format!("expected a table of strings, got {}", describe(other));
                self.error(key, message);
                return None;
            }
        };
        let path = self.field_path(key);
        let mut out = BTreeMap::new();
        let mut all_ok = true;
        for (k, v) in entries {
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                other => {
                    let message = format!("expected a string, got {}", describe(other));
                    self.problems.add(format!("{path}.{k}"), message);
                    all_ok = false;
                }
            }
        }
        all_ok.then_some(out)
    }
}

/// A short rendering of a wrong value for "expected X, got Y" messages:
/// TOML syntax for scalars and small arrays, a word for tables.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Table(_) => "a table".to_owned(),
        Value::Array(items) if items.iter().any(|v| matches!(v, Value::Table(_))) => {
            "an array of tables".to_owned()
        }
        other => other.to_string(),
    }
}

/// The known key closest to `key`, if close enough to be a plausible typo
/// (edit distance at most a third of its length, and at least 1).
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance (insertions, deletions, substitutions).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("outbund", "outbound"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn closest_only_suggests_plausible_typos() {
        let known = ["outbound", "inbound", "admin", "ingress"];
        assert_eq!(closest("outbund", &known), Some("outbound"));
        assert_eq!(closest("admn", &known), Some("admin"));
        assert_eq!(closest("Inbound", &known), Some("inbound"));
        assert_eq!(closest("metrics", &known), None);
    }
}

//! A TOML file as written, every key and value with its place, and its
//! tables read with every problem collected: a value of the wrong type, a
//! missing key and each unknown key (with a did-you-mean) are pushed to
//! [`Errors`] and reading goes on. Only a syntax error stops a file.

use super::suggest::{self, Schema};
use super::{from_toml, ConfigErrors, Errors};
use crate::config::duration::{self, GoDuration};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A byte range of the file's text; `None` where the TOML parser knows none.
pub type Span = Option<Range<usize>>;

/// A key as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub span: Span,
    pub name: String,
}

/// A value as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `None` for a table only implied by a longer header (`[check.metadata]`).
    pub span: Span,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime,
    Array(Vec<Node>),
    /// Keys in the order written.
    Table(Vec<(Key, Node)>),
}

impl Value {
    /// What it is, for "invalid type" messages.
    fn describe(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() <= 40 => format!("string {s:?}"),
            Value::String(_) => "a string".into(),
            Value::Integer(i) => format!("integer `{i}`"),
            Value::Float(f) => format!("floating point `{f}`"),
            Value::Boolean(b) => format!("boolean `{b}`"),
            Value::Datetime => "a date-time".into(),
            Value::Array(_) => "an array".into(),
            Value::Table(_) => "a table".into(),
        }
    }
}

/// A value read from a file, with where it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    pub value: T,
    pub span: Span,
}

/// Parse TOML text into its top-level table. A syntax error is the one error.
pub fn parse(file: &Path, text: &str) -> Result<Vec<(Key, Node)>, ConfigErrors> {
    let root: Node = toml::from_str(text).map_err(|e| ConfigErrors::from(from_toml(file, text, &e)))?;
    match root.value {
        Value::Table(entries) => Ok(entries),
        _ => Ok(Vec::new()), // A TOML document is always a table.
    }
}

/// One table of a file, read key by key against the keys its [`Schema`]
/// gives it.
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    entries: &'a [(Key, Node)],
    /// `""` for the top level, else the table's key (`"check"`).
    name: &'static str,
    /// Where the table is written: for a problem of the whole table.
    span: &'a Span,
    schema: &'static Schema,
}

const NO_SPAN: &Span = &None;

const STRING_HINT: &str = "write it in double quotes";
const DURATION_HINT: &str = "write a positive Go-style duration such as \"500ms\", \"15s\" or \"1m\"";

impl<'a> Section<'a> {
    /// The top level of a file (the table named `""` in `schema`); reports
    /// its unknown keys.
    pub fn top(entries: &'a [(Key, Node)], schema: &'static Schema, errs: &mut Errors) -> Self {
        Section::open(entries, "", NO_SPAN, schema, errs)
    }

    /// A table of `schema` that is not in the file: every key absent.
    pub fn empty(name: &'static str, schema: &'static Schema) -> Section<'static> {
        Section { entries: &[], name, span: NO_SPAN, schema }
    }

    fn open(entries: &'a [(Key, Node)], name: &'static str, span: &'a Span, schema: &'static Schema, errs: &mut Errors) -> Self {
        let section = Section { entries, name, span, schema };
        let known = section.known();
        for (key, node) in entries {
            if !known.contains(&key.name.as_str()) {
                let hint = suggest::hint(&key.name, name, schema)
                    .unwrap_or_else(|| "remove it or fix its spelling (see the configuration reference in README.md)".into());
                errs.at(key.span.clone().or_else(|| node.span.clone()), format!("unknown field `{}`{}", key.name, section.within()), hint);
            }
        }
        section
    }

    /// Where the table is written (`None` for the top level).
    pub fn span(&self) -> Span {
        self.span.clone()
    }

    fn known(&self) -> &'static [&'static str] {
        self.schema.iter().find(|(t, _)| *t == self.name).map_or(&[], |(_, keys)| keys)
    }

    /// `" in [check]"`, or nothing at the top level.
    fn within(&self) -> String {
        if self.name.is_empty() {
            String::new()
        } else {
            format!(" in [{}]", self.name)
        }
    }

    /// `check.interval`: a key as messages name it.
    pub fn dotted(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    /// The value of `key` and where it is (the key's place if the value has none).
    fn entry(&self, key: &str) -> Option<(&'a Node, Span)> {
        debug_assert!(self.known().contains(&key), "{key} is not in the schema of [{}]", self.name);
        self.entries.iter().find(|(k, _)| k.name == key).map(|(k, n)| (n, n.span.clone().or_else(|| k.span.clone())))
    }

    pub fn has(&self, key: &str) -> bool {
        self.entry(key).is_some()
    }

    /// Report `key` as missing unless it is there (whatever its type).
    pub fn require(&self, key: &str, hint: &str, errs: &mut Errors) {
        if !self.has(key) {
            errs.at(self.span(), format!("missing field `{key}`{}", self.within()), hint);
        }
    }

    fn wrong(&self, what: &str, node: &Node, span: Span, expected: &str, hint: &str, errs: &mut Errors) {
        errs.at(span, format!("invalid type for {what}: {}, expected {expected}", node.value.describe()), hint);
    }

    pub fn string(&self, key: &str, errs: &mut Errors) -> Option<At<String>> {
        let (node, span) = self.entry(key)?;
        match &node.value {
            Value::String(s) => Some(At { value: s.clone(), span }),
            _ => {
                self.wrong(&self.dotted(key), node, span, "a string", STRING_HINT, errs);
                None
            }
        }
    }

    pub fn path(&self, key: &str, errs: &mut Errors) -> Option<At<PathBuf>> {
        self.string(key, errs).map(|s| At { value: PathBuf::from(s.value), span: s.span })
    }

    pub fn integer(&self, key: &str, errs: &mut Errors) -> Option<At<i64>> {
        let (node, span) = self.entry(key)?;
        match &node.value {
            Value::Integer(i) => Some(At { value: *i, span }),
            _ => {
                self.wrong(&self.dotted(key), node, span, "an integer", "write a whole number without quotes", errs);
                None
            }
        }
    }

    pub fn boolean(&self, key: &str, errs: &mut Errors) -> Option<At<bool>> {
        let (node, span) = self.entry(key)?;
        match &node.value {
            Value::Boolean(b) => Some(At { value: *b, span }),
            _ => {
                self.wrong(&self.dotted(key), node, span, "a boolean", "write true or false, without quotes", errs);
                None
            }
        }
    }

    /// A Go-style duration string ("15s"); zero and negative are errors.
    pub fn duration(&self, key: &str, errs: &mut Errors) -> Option<At<GoDuration>> {
        let (node, span) = self.entry(key)?;
        match &node.value {
            Value::String(s) => match duration::parse(s) {
                Ok(d) => Some(At { value: GoDuration(d), span }),
                Err(why) => {
                    // The parser's message may already say what to write.
                    let (message, hint) = why.split_once("; ").unwrap_or((&why, DURATION_HINT));
                    errs.at(span, message, hint);
                    None
                }
            },
            _ => {
                self.wrong(&self.dotted(key), node, span, "a duration string", DURATION_HINT, errs);
                None
            }
        }
    }

    /// An array of strings; an item of another type is reported and left out.
    pub fn strings(&self, key: &str, errs: &mut Errors) -> Option<At<Vec<At<String>>>> {
        let (node, span) = self.entry(key)?;
        let Value::Array(items) = &node.value else {
            self.wrong(&self.dotted(key), node, span, "an array of strings", "write a list such as [\"a\", \"b\"]", errs);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match &item.value {
                Value::String(s) => out.push(At { value: s.clone(), span: item.span.clone() }),
                _ => self.wrong(&format!("an item of {}", self.dotted(key)), item, item.span.clone(), "a string", STRING_HINT, errs),
            }
        }
        Some(At { value: out, span })
    }

    /// A table of this file's schema (a `[name]` section or an inline
    /// table); reports its unknown keys.
    pub fn table(&self, key: &'static str, errs: &mut Errors) -> Option<Section<'a>> {
        let (k, node) = self.entries.iter().find(|(k, _)| k.name == key)?;
        debug_assert!(self.known().contains(&key), "{key} is not in the schema of [{}]", self.name);
        debug_assert!(self.schema.iter().any(|(t, _)| *t == key), "{key} is not a table of the schema");
        match &node.value {
            Value::Table(entries) => {
                let span = if node.span.is_some() { &node.span } else { &k.span };
                Some(Section::open(entries, key, span, self.schema, errs))
            }
            _ => {
                let hint = format!("write it as a [{key}] section");
                self.wrong(&self.dotted(key), node, node.span.clone().or_else(|| k.span.clone()), "a table", &hint, errs);
                None
            }
        }
    }

    /// A table that may also be written as an array of tables (`[check]`
    /// or `[[check]]`): each one read like [`Section::table`]; none if absent.
    pub fn tables(&self, key: &'static str, errs: &mut Errors) -> Vec<Section<'a>> {
        let Some((k, node)) = self.entries.iter().find(|(k, _)| k.name == key) else { return Vec::new() };
        let Value::Array(items) = &node.value else { return self.table(key, errs).into_iter().collect() };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match &item.value {
                Value::Table(entries) => {
                    let span = if item.span.is_some() { &item.span } else { &k.span };
                    out.push(Section::open(entries, key, span, self.schema, errs));
                }
                _ => {
                    let hint = format!("write each as a [[{key}]] section");
                    self.wrong(&self.dotted(key), item, item.span.clone().or_else(|| k.span.clone()), "a table", &hint, errs);
                }
            }
        }
        out
    }

    /// A free-form table of strings (`meta`, `[check.metadata]`): its keys
    /// and values in the order written; a value of another type is reported
    /// and left out.
    pub fn string_map(&self, key: &str, errs: &mut Errors) -> Vec<(At<String>, At<String>)> {
        let Some((node, span)) = self.entry(key) else { return Vec::new() };
        let Value::Table(entries) = &node.value else {
            let hint = format!("write it as a table of strings, e.g. {key} = {{ key = \"value\" }}");
            self.wrong(&self.dotted(key), node, span, "a table", &hint, errs);
            return Vec::new();
        };
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let vspan = v.span.clone().or_else(|| k.span.clone());
            match &v.value {
                Value::String(s) => out.push((At { value: k.name.clone(), span: k.span.clone() }, At { value: s.clone(), span: vspan })),
                _ => {
                    let what = format!("{}.{}", self.dotted(key), k.name);
                    self.wrong(&what, v, vspan, "a string", STRING_HINT, errs);
                }
            }
        }
        out
    }
}

// How toml hands out places: `toml::Spanned` asks for a struct of this name
// and fields, and toml answers with a map of start, end and value when it
// knows the place, or with the value itself when it does not (a table only
// implied by a longer header, `[check.metadata]` without `[check]`). Spanned
// cannot take the second answer; `Key` and `Node` take both. A date-time is a
// map with one key of toml's own. (The unit tests fail if these ever change.)
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME: &str = "$__toml_private_datetime";

/// The rest of a spanned map after its start key: end and value.
fn rest_of_spanned<'de, A: MapAccess<'de>, T: Deserialize<'de>>(start: usize, map: &mut A) -> Result<(Range<usize>, T), A::Error> {
    let (mut end, mut value) = (None, None);
    while let Some(k) = map.next_key::<String>()? {
        match k.as_str() {
            SPANNED_END => end = Some(map.next_value::<usize>()?),
            SPANNED_VALUE => value = Some(map.next_value::<T>()?),
            _ => return Err(de::Error::unknown_field(&k, SPANNED_FIELDS)),
        }
    }
    match (end, value) {
        (Some(end), Some(value)) => Ok((start..end, value)),
        _ => Err(de::Error::custom("incomplete spanned value")),
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key { span: None, name: v.to_string() })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
                match map.next_key::<String>()?.as_deref() {
                    Some(SPANNED_START) => {
                        let start = map.next_value::<usize>()?;
                        let (span, name) = rest_of_spanned::<A, String>(start, &mut map)?;
                        Ok(Key { span: Some(span), name })
                    }
                    _ => Err(de::Error::custom("expected a key")),
                }
            }
        }
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, NodeVisitor)
    }
}

/// A value without asking for its place: what a spanned map holds.
struct Bare(Value);

impl<'de> Deserialize<'de> for Bare {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor).map(|n| Bare(n.value))
    }
}

struct NodeVisitor;

fn placeless(value: Value) -> Node {
    Node { span: None, value }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(placeless(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(placeless(Value::String(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(placeless(Value::Integer(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v).map(|v| placeless(Value::Integer(v))).map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(placeless(Value::Float(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(placeless(Value::Boolean(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(placeless(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(first) = map.next_key::<Key>()? else { return Ok(placeless(Value::Table(Vec::new()))) };
        match first.name.as_str() {
            // A spanned map's keys have no place of their own; a table's do.
            SPANNED_START if first.span.is_none() => {
                let start = map.next_value::<usize>()?;
                let (span, Bare(value)) = rest_of_spanned(start, &mut map)?;
                Ok(Node { span: Some(span), value })
            }
            DATETIME if first.span.is_none() => {
                map.next_value::<IgnoredAny>()?;
                Ok(placeless(Value::Datetime))
            }
            _ => {
                let mut entries = vec![(first, map.next_value::<Node>()?)];
                while let Some(key) = map.next_key::<Key>()? {
                    let value = map.next_value::<Node>()?;
                    entries.push((key, value));
                }
                Ok(placeless(Value::Table(entries)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Vec<(Key, Node)> {
        parse(Path::new("f.toml"), text).expect("valid TOML")
    }

    fn find<'a>(entries: &'a [(Key, Node)], key: &str) -> &'a (Key, Node) {
        entries.iter().find(|(k, _)| k.name == key).expect(key)
    }

    #[test]
    fn keys_and_values_keep_their_places() {
        let text =
            "port = 1\n[check.metadata]\nx = \"y\"\n[damping]\nhold = \"1s\"\nt = 1979-05-27T07:32:00Z\ncheck.a.b = [1, { c = 2.5 }]\n";
        let top = doc(text);
        let (k, n) = find(&top, "port");
        assert_eq!((k.span.clone(), n.span.clone(), &n.value), (Some(0..4), Some(7..8), &Value::Integer(1)));
        // `check` is only implied by `[check.metadata]`: its key has a place, its table none.
        let (k, n) = find(&top, "check");
        assert_eq!(&text[k.span.clone().unwrap()], "check");
        let Value::Table(check) = &n.value else { panic!("{n:?}") };
        let (k, n) = find(check, "metadata");
        assert_eq!(&text[k.span.clone().unwrap()], "metadata");
        let Value::Table(meta) = &n.value else { panic!("{n:?}") };
        let (k, n) = find(meta, "x");
        assert_eq!((&text[k.span.clone().unwrap()], &text[n.span.clone().unwrap()]), ("x", "\"y\""));
        let (_, n) = find(&top, "damping");
        let Value::Table(damping) = &n.value else { panic!("{n:?}") };
        assert_eq!(find(damping, "t").1.value, Value::Datetime);
        // A dotted key under [damping] is a table in [damping].
        let Value::Table(dotted) = &find(damping, "check").1.value else { panic!() };
        let Value::Table(a) = &find(dotted, "a").1.value else { panic!() };
        let (k, n) = find(a, "b");
        assert_eq!(&text[k.span.clone().unwrap()], "b");
        let Value::Array(items) = &n.value else { panic!("{n:?}") };
        assert_eq!(items[0].value, Value::Integer(1));
        let Value::Table(c) = &items[1].value else { panic!() };
        assert_eq!(find(c, "c").1.value, Value::Float(2.5));
    }

    #[test]
    fn syntax_errors_are_one_error_on_one_line() {
        let e = parse(Path::new("f.toml"), "x = \n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(!e.to_string().contains('\n'), "{e}");
        assert!(e.to_string().starts_with("f.toml:1:5: "), "{e}");
        let e = parse(Path::new("f.toml"), "a = 1\na = 2\n").unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
    }

    const SCHEMA: &Schema = &[("", &["port", "name", "tags", "meta", "check"]), ("check", &["interval"])];

    #[test]
    fn a_section_reports_every_problem() {
        let text = "port = \"x\"\nprot = 1\ntags = [\"a\", 2]\nmeta = { k = 1, j = \"v\" }\n[check]\ninterval = 5\nintervall = \"1s\"\n";
        let top = doc(text);
        let mut errs = Errors::new(Path::new("f.toml"), text);
        let s = Section::top(&top, SCHEMA, &mut errs);
        assert_eq!(s.integer("port", &mut errs), None);
        s.require("name", "add it", &mut errs);
        let tags = s.strings("tags", &mut errs).unwrap();
        assert_eq!(tags.value.len(), 1);
        let meta = s.string_map("meta", &mut errs);
        assert_eq!(meta.len(), 1);
        let check = s.table("check", &mut errs).unwrap();
        assert_eq!(check.duration("interval", &mut errs), None);
        let e = errs.finish(()).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            [
                "f.toml:1:8: invalid type for port: string \"x\", expected an integer; write a whole number without quotes",
                "f.toml:2:1: unknown field `prot`; did you mean `port`?",
                "f.toml:3:14: invalid type for an item of tags: integer `2`, expected a string; write it in double quotes",
                "f.toml:4:14: invalid type for meta.k: integer `1`, expected a string; write it in double quotes",
                "f.toml:6:12: invalid type for check.interval: integer `5`, expected a duration string; write a positive Go-style duration such as \"500ms\", \"15s\" or \"1m\"",
                "f.toml:7:1: unknown field `intervall` in [check]; did you mean `interval`?",
                "f.toml: missing field `name`; add it",
            ],
            "{e}"
        );
    }
}

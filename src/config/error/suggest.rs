//! "Did you mean ...?" for an unknown key: the closest key of its own table,
//! or the same key in the table where it belongs.

/// Edit distance between two keys, compared without case and with `-` as `_`:
/// insertions, deletions, substitutions and swaps of neighbours each count
/// one (optimal string alignment, the usual typo distance).
pub fn distance(a: &str, b: &str) -> usize {
    let norm = |s: &str| s.chars().map(|c| if c == '-' { '_' } else { c.to_ascii_lowercase() }).collect::<Vec<_>>();
    let (a, b) = (norm(a), norm(b));
    // rows[i][j]: distance between a[..i] and b[..j]; three rows are enough.
    let mut before = vec![0usize; b.len() + 1];
    let mut last: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (last[j] + 1).min(row[j - 1] + 1).min(last[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut last, row);
    }
    last[b.len()]
}

/// How many edits still make a typo rather than another word: none for
/// one- or two-letter keys, one up to five letters, two beyond.
fn allowed(word: &str) -> usize {
    match word.chars().count() {
        0..=2 => 0,
        3..=5 => 1,
        _ => 2,
    }
}

/// The candidate closest to `word`, if it is close enough to be a typo of it.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().map(|c| (distance(word, c), *c)).filter(|(d, _)| *d <= allowed(word)).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

/// The tables of one kind of file: a table's name (`""` for the top level)
/// and the keys it knows.
pub type Schema = [(&'static str, &'static [&'static str])];

/// The hint for an unknown `key` in `table`, if there is a likely meaning: a
/// close key of the same table first, else the key in another table of the
/// same file (written exactly, then close).
pub fn hint(key: &str, table: &str, schema: &Schema) -> Option<String> {
    let own = schema.iter().find(|(t, _)| *t == table).map_or(&[][..], |(_, keys)| keys);
    if let Some(k) = closest(key, own) {
        return Some(format!("did you mean `{k}`?"));
    }
    let others = || schema.iter().filter(|(t, _)| *t != table);
    let exact: Vec<String> = others().filter_map(|(t, keys)| keys.iter().find(|k| distance(key, k) == 0).map(|k| place(k, t))).collect();
    let found = if exact.is_empty() { others().filter_map(|(t, keys)| closest(key, keys).map(|k| place(k, t))).collect() } else { exact };
    (!found.is_empty()).then(|| format!("did you mean {}?", found.join(" or ")))
}

/// `` `interval` in [check] ``, or `` `port` at the top level (before any [table]) ``.
fn place(key: &str, table: &str) -> String {
    if table.is_empty() {
        format!("`{key}` at the top level (before any [table])")
    } else {
        format!("`{key}` in [{table}]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &Schema = &[("", &["name", "port", "ttl", "check"]), ("check", &["interval", "timeout", "mode", "rise"])];

    #[test]
    fn distance_counts_typos() {
        assert_eq!(distance("interval", "interval"), 0);
        assert_eq!(distance("intervall", "interval"), 1);
        assert_eq!(distance("prot", "port"), 1, "a swap is one edit");
        assert_eq!(distance("Interval", "interval"), 0);
        assert_eq!(distance("deregister-critical-after", "deregister_critical_after"), 0);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(hint("intervall", "check", SCHEMA).as_deref(), Some("did you mean `interval`?"));
        assert_eq!(hint("tiemout", "check", SCHEMA).as_deref(), Some("did you mean `timeout`?"));
        assert_eq!(hint("prot", "", SCHEMA).as_deref(), Some("did you mean `port`?"));
        assert_eq!(hint("banana", "check", SCHEMA), None);
        assert_eq!(hint("x", "", SCHEMA), None);
        assert_eq!(hint("TTL", "", SCHEMA).as_deref(), Some("did you mean `ttl`?"), "case alone is a typo");
    }

    #[test]
    fn suggests_the_table_a_key_belongs_in() {
        assert_eq!(hint("interval", "", SCHEMA).as_deref(), Some("did you mean `interval` in [check]?"));
        assert_eq!(hint("intervall", "", SCHEMA).as_deref(), Some("did you mean `interval` in [check]?"));
        assert_eq!(hint("port", "check", SCHEMA).as_deref(), Some("did you mean `port` at the top level (before any [table])?"));
    }
}

//! Property test: valid files, mutated at random (lines deleted, duplicated
//! or swapped, values changed, the file truncated), never make the loader
//! panic, and every rejection points inside the file.

use std::path::Path;

use proptest::prelude::*;
use stoke_config::{load_str, ConfigError};

fn seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out: Vec<String> = ["network.toml", "local.toml"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).expect("example exists"))
        .collect();
    out.sort();
    out
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    /// Replace the value after `=` on a line with one of a set of odd values.
    Value(usize, usize),
    Truncate(usize),
    /// Insert a byte at a position.
    Insert(usize, u8),
}

const ODD_VALUES: &[&str] = &[
    "0",
    "-1",
    "99999999999999999999",
    "1.5",
    "\"\"",
    "\"x\"",
    "\"0ms\"",
    "\"127.0.0.1:0\"",
    "[]",
    "[\"a\", 1]",
    "{}",
    "true",
    "nan",
    "1979-05-27T07:32:00Z",
    "\"\u{1F600}\"",
    "\"*.\"",
    "\"body:\"",
    "{ url = \"ftp://x\" }",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Value(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Insert(a, b)),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut tail: Option<usize> = None;
    let mut insert: Option<(usize, u8)> = None;
    for m in mutations {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match *m {
            Mutation::Delete(i) => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Mutation::Swap(a, b) => lines.swap(a % n, b % n),
            Mutation::Value(i, v) => {
                let line = &mut lines[i % n];
                if let Some(eq) = line.find('=') {
                    line.truncate(eq + 1);
                    line.push(' ');
                    line.push_str(ODD_VALUES[v % ODD_VALUES.len()]);
                }
            }
            Mutation::Truncate(at) => tail = Some(at),
            Mutation::Insert(at, b) => insert = Some((at, b)),
        }
    }
    let mut out = lines.join("\n");
    if let Some((at, b)) = insert {
        let mut bytes = out.into_bytes();
        let at = at % (bytes.len() + 1);
        bytes.insert(at, b);
        out = String::from_utf8_lossy(&bytes).into_owned();
    }
    if let Some(at) = tail {
        let mut at = at % (out.len() + 1);
        while !out.is_char_boundary(at) {
            at -= 1;
        }
        out.truncate(at);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic_and_errors_point_inside(
        seed in 0usize..2,
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let text = apply(&seeds()[seed], &mutations);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join("mutated.toml");
        match load_str(&text, &path) {
            Ok(_) => {}
            Err(ConfigError::Invalid { problems, .. }) => {
                prop_assert!(!problems.is_empty());
                let line_count = text.lines().count().max(1) + 1;
                for p in &problems {
                    prop_assert!(p.span.start <= text.len(), "span {:?} outside {} bytes", p.span, text.len());
                    prop_assert!(p.line >= 1 && p.line <= line_count, "line {} of {}", p.line, line_count);
                    prop_assert!(p.column >= 1);
                    prop_assert!(!p.message.is_empty());
                }
            }
            Err(other) => prop_assert!(false, "unexpected error kind: {other}"),
        }
    }
}

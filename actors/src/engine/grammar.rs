//! Bounds before llama.cpp's parsers of client input, and the thread they
//! run on.
//!
//! llama.cpp's GBNF parser recurses once per nesting level and expands
//! every `{m,n}` repetition into copies; its JSON-schema converter runs a
//! recursive `std::regex` over every rule name and grows as n³ with the
//! optional properties of one object. A stack overflow there is an abort of
//! the whole process, not a panic. So a grammar or a schema is first
//! measured here (linear, iterative, no recursion), refused with the field,
//! the rule and the value when it is outside the bounds below, and only
//! then handed to llama.cpp, on a thread of [`PARSER_STACK_BYTES`] under a
//! time budget of [`PARSE_BUDGET`].
//!
//! The bounds were chosen by measurement on a 2-core VM (docs/http-api.md, "Bounds"):
//! at each limit the conversion and the parse take well under the budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::error::EngineError;

/// Stack of a parser thread: what the bounds allow needs a few MiB (a
/// 120,000-character rule name is ~10 MiB of `std::regex` recursion).
pub const PARSER_STACK_BYTES: usize = 64 << 20;

/// Longest a conversion or a parse may take before the request is refused.
pub const PARSE_BUDGET: Duration = Duration::from_secs(2);

/// Parser threads alive at once; a request beyond them is refused as busy.
/// A thread past its budget is left to finish (it cannot be stopped) and
/// counts here until it does.
pub const MAX_PARSER_THREADS: usize = 4;

/// Longest GBNF grammar a client may send.
pub const MAX_GRAMMAR_BYTES: usize = 65_536;
/// Longest grammar a JSON schema may turn into.
pub const MAX_CONVERTED_GRAMMAR_BYTES: usize = 1 << 20;
/// Deepest nesting of `( … )` in a grammar (llama.cpp recurses per level).
pub const MAX_GRAMMAR_NESTING: usize = 256;
/// Most grammar elements once every repetition is expanded (llama.cpp
/// copies `x{m,n}` into m copies and n−m rules).
pub const MAX_GRAMMAR_ELEMENTS: u64 = 200_000;
/// Most rules (named, groups and the rules repetitions make).
pub const MAX_GRAMMAR_RULES: u64 = 20_000;
/// Most parse stacks one rule may start (llama.cpp follows every
/// alternative whose first symbols are rules, down to a character, each time
/// the grammar enters the rule: `r0 ::= r1 | r1`, `r1 ::= r2 | r2`, … is 2ⁿ
/// stacks, 2 s at n = 26 on the step loop, and exponential per token).
pub const MAX_GRAMMAR_STACKS: u64 = 10_000;

/// Longest JSON schema (serialized) a request may carry.
pub const MAX_SCHEMA_BYTES: usize = 524_288;
/// Deepest nesting of objects and arrays in a schema.
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// Most properties in one schema, all objects together (OpenAI's bound).
pub const MAX_SCHEMA_PROPERTIES: usize = 5_000;
/// Most optional (not `required`) properties of one object: llama.cpp's
/// converter writes a rule per suffix of them (n³ work).
pub const MAX_OPTIONAL_PROPERTIES: usize = 100;
/// Most values of one `enum`.
pub const MAX_ENUM_VALUES: usize = 1_000;
/// Longest property name: each becomes a rule name that llama.cpp runs a
/// recursive `std::regex` over (once per rule below it, too).
pub const MAX_NAME_CHARS: usize = 1_000;
/// Most characters of property names and enum values in all (OpenAI's bound).
pub const MAX_SCHEMA_TEXT_CHARS: usize = 120_000;
/// Longest `pattern`.
pub const MAX_PATTERN_CHARS: usize = 1_000;
/// Largest `minItems`, `maxItems`, `minLength`, `maxLength`, `minProperties`
/// and `maxProperties` (each becomes a `{m,n}` repetition).
pub const MAX_SCHEMA_REPEAT: u64 = 10_000;

/// A JSON schema the reply must follow, named by the request field that
/// carried it; turned into a grammar when the request is prepared.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonSchema {
    pub field: String,
    pub schema: Value,
    /// The schemas `schema` is made of, each with its own field (a
    /// request's tools): when the whole cannot be converted, the first part
    /// that cannot is named.
    pub parts: Vec<(String, Value)>,
}

fn refused(field: &str, rule: impl std::fmt::Display, value: impl std::fmt::Display) -> EngineError {
    EngineError::Refused { field: field.to_string(), message: format!("invalid {field}: {rule}, got {value}") }
}

/// Checks a JSON schema against the bounds above, without recursion.
pub fn check_schema(schema: &Value, field: &str) -> Result<(), EngineError> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(refused(field, "must be a JSON schema object", short(&schema.to_string())));
    }
    let bytes = schema.to_string().len();
    if bytes > MAX_SCHEMA_BYTES {
        return Err(refused(field, format_args!("must be at most {MAX_SCHEMA_BYTES} bytes"), format!("{bytes} bytes")));
    }
    let mut properties = 0usize;
    let mut text = 0usize;
    // (value, depth, path) of every node still to look at.
    let mut todo: Vec<(&Value, usize, String)> = vec![(schema, 0, String::new())];
    while let Some((v, depth, path)) = todo.pop() {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(refused(
                field,
                format_args!("must nest objects and arrays at most {MAX_SCHEMA_DEPTH} deep"),
                format!("deeper at {}", if path.is_empty() { "/" } else { &path }),
            ));
        }
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    todo.push((item, depth + 1, format!("{path}/{i}")));
                }
            }
            Value::Object(map) => {
                if let Some(Value::Object(props)) = map.get("properties") {
                    properties += props.len();
                    if properties > MAX_SCHEMA_PROPERTIES {
                        return Err(refused(
                            field,
                            format_args!("must have at most {MAX_SCHEMA_PROPERTIES} properties in all"),
                            format!("more at {path}/properties"),
                        ));
                    }
                    let required: Vec<&str> = match map.get("required") {
                        Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                        _ => Vec::new(),
                    };
                    let optional = props.keys().filter(|k| !required.contains(&k.as_str())).count();
                    if optional > MAX_OPTIONAL_PROPERTIES {
                        return Err(refused(
                            field,
                            format_args!(
                                "an object may have at most {MAX_OPTIONAL_PROPERTIES} optional properties (list the \
                                 others in required)"
                            ),
                            format!("{optional} at {path}/properties"),
                        ));
                    }
                    if let Some(long) = props.keys().find(|k| k.chars().count() > MAX_NAME_CHARS) {
                        return Err(refused(
                            field,
                            format_args!("a property name must be at most {MAX_NAME_CHARS} characters"),
                            format!("{} characters at {path}/properties", long.chars().count()),
                        ));
                    }
                    text += props.keys().map(|k| k.chars().count()).sum::<usize>();
                }
                if let Some(Value::Array(values)) = map.get("enum") {
                    if values.len() > MAX_ENUM_VALUES {
                        return Err(refused(
                            field,
                            format_args!("an enum may have at most {MAX_ENUM_VALUES} values"),
                            format!("{} at {path}/enum", values.len()),
                        ));
                    }
                    text += values.iter().map(|e| e.to_string().chars().count()).sum::<usize>();
                }
                if let Some(c) = map.get("const") {
                    text += c.to_string().chars().count();
                }
                if text > MAX_SCHEMA_TEXT_CHARS {
                    return Err(refused(
                        field,
                        format_args!(
                            "must have at most {MAX_SCHEMA_TEXT_CHARS} characters of property names and enum values \
                             in all"
                        ),
                        format!("more at {}", if path.is_empty() { "/" } else { &path }),
                    ));
                }
                if let Some(p) = map.get("pattern").and_then(Value::as_str) {
                    let n = p.chars().count();
                    if n > MAX_PATTERN_CHARS {
                        return Err(refused(
                            field,
                            format_args!("a pattern must be at most {MAX_PATTERN_CHARS} characters"),
                            format!("{n} at {path}/pattern"),
                        ));
                    }
                }
                for key in ["minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"] {
                    if let Some(n) = map.get(key).filter(|n| n.is_number()) {
                        if n.as_u64().is_none_or(|n| n > MAX_SCHEMA_REPEAT) {
                            return Err(refused(
                                field,
                                format_args!("{key} must be an integer between 0 and {MAX_SCHEMA_REPEAT}"),
                                format!("{n} at {path}/{key}"),
                            ));
                        }
                    }
                }
                if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                    if !r.starts_with('#') {
                        return Err(refused(
                            field,
                            "a $ref must point into the schema itself (#/…); nothing is fetched",
                            format!("{} at {path}/$ref", short(r)),
                        ));
                    }
                }
                for (k, child) in map {
                    if child.is_object() || child.is_array() {
                        todo.push((child, depth + 1, format!("{path}/{k}")));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The size of a GBNF grammar once llama.cpp has expanded it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrammarSize {
    pub nesting: usize,
    pub elements: u64,
    pub rules: u64,
    /// The most parse stacks entering one rule starts ([`MAX_GRAMMAR_STACKS`];
    /// `u64::MAX`: a rule reaches itself before any character, left recursion).
    pub stacks: u64,
}

/// Measures a GBNF grammar as llama.cpp's parser would build it, in one
/// pass without recursion: the deepest `( … )` nesting, the elements once
/// every repetition is expanded, and the rules. Text it cannot follow is
/// left to llama.cpp's parser, which refuses it.
pub fn measure_gbnf(text: &str) -> GrammarSize {
    let b = text.as_bytes();
    let mut size = GrammarSize::default();
    // Elements of the symbol just read (what a repetition copies).
    let mut last: u64 = 0;
    let mut depth = 0usize;
    let mut i = 0;
    // Each `(` and each `::=` starts a rule.
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                // One element per character.
                let mut n = 0u64;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                    n += 1;
                }
                last = n.max(1);
                size.elements += last;
            }
            b'[' => {
                let mut n = 1u64;
                i += 1;
                while i < b.len() && b[i] != b']' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                    n += 1;
                }
                last = n;
                size.elements += last;
            }
            b'<' => {
                while i < b.len() && b[i] != b'>' {
                    i += 1;
                }
                last = 1;
                size.elements += 1;
            }
            b'(' => {
                depth += 1;
                size.nesting = size.nesting.max(depth);
                size.rules += 1;
                last = 0;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                // The group is one reference to its rule.
                last = 1;
                size.elements += 1;
            }
            b':' if b[i..].starts_with(b"::=") => {
                size.rules += 1;
                last = 0;
                i += 3;
                continue;
            }
            b'*' | b'+' | b'?' => {
                // One new rule holding a copy of the symbol, and a reference.
                size.rules += 1;
                size.elements += last + 2;
            }
            b'{' => {
                let end = b[i..].iter().position(|c| *c == b'}').map_or(b.len(), |p| i + p);
                let inner = std::str::from_utf8(&b[i + 1..end]).unwrap_or("");
                let mut parts = inner.splitn(2, ',');
                let num = |s: Option<&str>| {
                    s.map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse::<u64>().unwrap_or(u64::MAX))
                };
                let min = num(parts.next()).unwrap_or(0);
                let max = match parts.next() {
                    None => min,
                    Some(m) => num(Some(m)).unwrap_or(min.saturating_add(1)),
                };
                let copies = min.max(max).max(1);
                size.elements = size.elements.saturating_add(last.max(1).saturating_mul(copies.saturating_add(1)));
                size.rules = size.rules.saturating_add(max.saturating_sub(min).max(1));
                i = end + 1;
                continue;
            }
            c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'_') {
                    i += 1;
                }
                // A rule's own name (before `::=`) is not an element of it.
                let rest = &b[i..];
                let skipped = rest.iter().take_while(|c| **c == b' ' || **c == b'\t').count();
                if !rest[skipped..].starts_with(b"::=") {
                    last = 1;
                    size.elements += 1;
                }
                continue;
            }
            b'.' => {
                last = 1;
                size.elements += 1;
            }
            _ => {}
        }
        i += 1;
    }
    size
}

/// One symbol of an alternative, as [`stacks_of`] needs it.
#[derive(Clone, Copy, Debug)]
enum Sym {
    /// Characters (a literal, a class, `.`, a token): one stack.
    Chars { empty: bool },
    /// A rule, named or a group; `optional` after `*`, `?` or `{0,…}`.
    Rule { id: usize, optional: bool },
}

/// The most parse stacks that entering any one rule of `text` starts, as
/// llama.cpp's `advance_stack` builds them: each alternative contributes
/// the stacks of its leading symbols up to the first one that cannot be
/// empty (an upper bound: a repetition counts as its symbol). Parsed and
/// counted without recursion; `u64::MAX` for a rule that reaches itself
/// before any character (left recursion, which llama.cpp refuses too).
pub fn stacks_of(text: &str) -> u64 {
    let b = text.as_bytes();
    let mut names: HashMap<&str, usize> = HashMap::new();
    // rules[id] = its alternatives.
    let mut rules: Vec<Vec<Vec<Sym>>> = Vec::new();
    let new_rule = |rules: &mut Vec<Vec<Vec<Sym>>>| -> usize {
        rules.push(Vec::new());
        rules.len() - 1
    };
    // Open rules: (id, alternatives so far); the outermost is a named rule.
    let mut open: Vec<(usize, Vec<Vec<Sym>>)> = Vec::new();
    let close_all = |open: &mut Vec<(usize, Vec<Vec<Sym>>)>, rules: &mut Vec<Vec<Vec<Sym>>>| {
        while let Some((id, alts)) = open.pop() {
            rules[id].extend(alts);
            if let Some(parent) = open.last_mut() {
                parent.1.last_mut().expect("an alternative").push(Sym::Rule { id, optional: false });
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let push = |open: &mut Vec<(usize, Vec<Vec<Sym>>)>, sym: Sym| {
            if let Some((_, alts)) = open.last_mut() {
                alts.last_mut().expect("an alternative").push(sym);
            }
        };
        match c {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                push(&mut open, Sym::Chars { empty: i == start + 1 });
            }
            b'[' => {
                i += 1;
                while i < b.len() && b[i] != b']' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                push(&mut open, Sym::Chars { empty: false });
            }
            b'<' => {
                while i < b.len() && b[i] != b'>' {
                    i += 1;
                }
                push(&mut open, Sym::Chars { empty: false });
            }
            b'.' => push(&mut open, Sym::Chars { empty: false }),
            b'(' => {
                let id = new_rule(&mut rules);
                open.push((id, vec![Vec::new()]));
            }
            b')' => {
                if open.len() > 1 {
                    let (id, alts) = open.pop().expect("a group");
                    rules[id].extend(alts);
                    push(&mut open, Sym::Rule { id, optional: false });
                }
            }
            b'|' => {
                if let Some((_, alts)) = open.last_mut() {
                    alts.push(Vec::new());
                }
            }
            b'*' | b'?' | b'{' | b'+' => {
                let optional = match c {
                    b'{' => {
                        let end = b[i..].iter().position(|c| *c == b'}').map_or(b.len(), |p| i + p);
                        let min = std::str::from_utf8(&b[i + 1..end]).unwrap_or("").split(',').next().unwrap_or("");
                        i = end;
                        min.trim().parse::<u64>().map_or(false, |m| m == 0)
                    }
                    b'+' => false,
                    _ => true,
                };
                if let Some(last) = open.last_mut().and_then(|(_, alts)| alts.last_mut()).and_then(|a| a.last_mut()) {
                    *last = match *last {
                        Sym::Rule { id, optional: o } => Sym::Rule { id, optional: o || optional },
                        Sym::Chars { empty } if optional => {
                            // A repeated character: a rule of its own that may be empty.
                            let id = new_rule(&mut rules);
                            rules[id].push(vec![Sym::Chars { empty }]);
                            Sym::Rule { id, optional: true }
                        }
                        chars => chars,
                    };
                }
            }
            c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'_') {
                    i += 1;
                }
                let name = &text[start..i];
                let rest = &b[i..];
                let skipped = rest.iter().take_while(|c| **c == b' ' || **c == b'\t').count();
                let id = match names.get(name) {
                    Some(&id) => id,
                    None => {
                        let id = new_rule(&mut rules);
                        names.insert(name, id);
                        id
                    }
                };
                if rest[skipped..].starts_with(b"::=") {
                    // A new rule: whatever was open ends here.
                    close_all(&mut open, &mut rules);
                    open.push((id, vec![Vec::new()]));
                    i += skipped + 3;
                } else {
                    push(&mut open, Sym::Rule { id, optional: false });
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    close_all(&mut open, &mut rules);

    // Which rules can match nothing (to a fixed point).
    let mut empty = vec![false; rules.len()];
    let sym_empty = |s: &Sym, empty: &[bool]| match *s {
        Sym::Chars { empty: e } => e,
        Sym::Rule { id, optional } => optional || empty[id],
    };
    loop {
        let mut changed = false;
        for id in 0..rules.len() {
            if !empty[id] && rules[id].iter().any(|alt| alt.iter().all(|s| sym_empty(s, &empty))) {
                empty[id] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    // The leading rules of each rule, then the stacks bottom-up, without recursion.
    let leading = |id: usize| -> (u64, Vec<usize>) {
        let (mut chars, mut refs) = (0u64, Vec::new());
        for alt in &rules[id] {
            let mut all_empty = true;
            for s in alt {
                match *s {
                    Sym::Chars { .. } => chars += 1,
                    Sym::Rule { id, .. } => refs.push(id),
                }
                if !sym_empty(s, &empty) {
                    all_empty = false;
                    break;
                }
            }
            if all_empty {
                chars += 1;
            }
        }
        (chars, refs)
    };
    const UNSEEN: u8 = 0;
    const OPEN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![UNSEEN; rules.len()];
    let mut stacks = vec![0u64; rules.len()];
    let mut most = 0u64;
    for root in 0..rules.len() {
        if state[root] == DONE {
            continue;
        }
        // (rule, its leading rules not yet looked at)
        let mut walk: Vec<(usize, Vec<usize>, u64)> = Vec::new();
        let (chars, refs) = leading(root);
        state[root] = OPEN;
        walk.push((root, refs, chars));
        while let Some(top) = walk.last_mut() {
            match top.1.pop() {
                Some(next) => match state[next] {
                    DONE => top.2 = top.2.saturating_add(stacks[next]),
                    OPEN => return u64::MAX,
                    _ => {
                        let (chars, refs) = leading(next);
                        state[next] = OPEN;
                        walk.push((next, refs, chars));
                    }
                },
                None => {
                    let (id, _, total) = walk.pop().expect("the top");
                    state[id] = DONE;
                    stacks[id] = total;
                    most = most.max(total);
                    if let Some(parent) = walk.last_mut() {
                        parent.2 = parent.2.saturating_add(total);
                    }
                }
            }
        }
    }
    most
}

/// Checks a GBNF grammar against the bounds; `field` names what carried it
/// (`grammar`, or the schema it was converted from).
pub fn check_gbnf(text: &str, field: &str, max_bytes: usize) -> Result<GrammarSize, EngineError> {
    if text.trim().is_empty() {
        return Err(refused(field, "must be a non-empty GBNF grammar", "\"\""));
    }
    if text.len() > max_bytes {
        return Err(refused(
            field,
            format_args!("must be a grammar of at most {max_bytes} bytes"),
            format!("{} bytes", text.len()),
        ));
    }
    let mut size = measure_gbnf(text);
    if size.nesting > MAX_GRAMMAR_NESTING {
        return Err(refused(
            field,
            format_args!("must nest ( … ) groups at most {MAX_GRAMMAR_NESTING} deep"),
            format!("{} levels", size.nesting),
        ));
    }
    size.stacks = stacks_of(text);
    if size.stacks > MAX_GRAMMAR_STACKS {
        return Err(refused(
            field,
            format_args!(
                "must start at most {MAX_GRAMMAR_STACKS} parse stacks from any rule (alternatives that begin with \
                 rules multiply)"
            ),
            if size.stacks == u64::MAX { "left recursion".to_string() } else { format!("{} stacks", size.stacks) },
        ));
    }
    if size.elements > MAX_GRAMMAR_ELEMENTS || size.rules > MAX_GRAMMAR_RULES {
        return Err(refused(
            field,
            format_args!(
                "must expand to at most {MAX_GRAMMAR_ELEMENTS} grammar elements and {MAX_GRAMMAR_RULES} rules \
                 (each x{{m,n}} repetition is copied out; lower the counts)"
            ),
            format!("{} elements and {} rules", size.elements, size.rules),
        ));
    }
    Ok(size)
}

/// The grammar of a JSON schema, by llama.cpp's own converter (as
/// llama-server uses), after [`check_schema`]; converted and then measured
/// on a parser thread.
pub fn schema_to_gbnf(schema: &JsonSchema) -> Result<String, EngineError> {
    check_schema(&schema.schema, &schema.field)?;
    let text = schema.schema.to_string();
    let field = schema.field.clone();
    let cannot = |field: &str, schema: &Value| {
        refused(
            field,
            "llama.cpp cannot turn this JSON schema into a grammar (an unsupported keyword, a $ref it cannot resolve, \
             or an invalid schema)",
            short(&schema.to_string()),
        )
    };
    let Ok(gbnf) = on_parser_thread(&field, move || llama_cpp_2::json_schema_to_grammar(&text))? else {
        for (field, part) in &schema.parts {
            let text = part.to_string();
            if on_parser_thread(field, move || llama_cpp_2::json_schema_to_grammar(&text).is_err())? {
                return Err(cannot(field, part));
            }
        }
        return Err(cannot(&schema.field, &schema.schema));
    };
    check_gbnf(&gbnf, &schema.field, MAX_CONVERTED_GRAMMAR_BYTES)?;
    Ok(gbnf)
}

static PARSER_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Runs `work` (a llama.cpp parser over client input) on a thread of its
/// own with a [`PARSER_STACK_BYTES`] stack, and waits at most
/// [`PARSE_BUDGET`]. Blocking: call it from a blocking thread.
pub fn on_parser_thread<T: Send + 'static>(
    field: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    if PARSER_THREADS.fetch_add(1, Ordering::SeqCst) >= MAX_PARSER_THREADS {
        PARSER_THREADS.fetch_sub(1, Ordering::SeqCst);
        return Err(EngineError::ParserBusy { limit: MAX_PARSER_THREADS });
    }
    struct Alive;
    impl Drop for Alive {
        fn drop(&mut self) {
            PARSER_THREADS.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned =
        std::thread::Builder::new().name("grammar-parse".into()).stack_size(PARSER_STACK_BYTES).spawn(move || {
            let _alive = Alive;
            let _ = tx.send(work());
        });
    if let Err(e) = spawned {
        PARSER_THREADS.fetch_sub(1, Ordering::SeqCst);
        return Err(EngineError::Backend(format!("could not start a grammar parser thread: {e}")));
    }
    rx.recv_timeout(PARSE_BUDGET).map_err(|e| match e {
        std::sync::mpsc::RecvTimeoutError::Timeout => refused(
            field,
            format_args!("must be simple enough to parse within {} ms", PARSE_BUDGET.as_millis()),
            "a grammar that took longer",
        ),
        // llama.cpp threw past the binding (it returns errors otherwise).
        std::sync::mpsc::RecvTimeoutError::Disconnected => {
            refused(field, "must be a grammar llama.cpp can parse", "one its parser failed on")
        }
    })
}

fn short(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_string()
    } else {
        format!("{}… ({} bytes)", s.chars().take(80).collect::<String>(), s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deep_groups_are_measured_without_recursion() {
        let g = format!("root ::= {}\"a\"{}", "(".repeat(8000), ")".repeat(8000));
        let size = measure_gbnf(&g);
        assert_eq!(size.nesting, 8000);
        let e = check_gbnf(&g, "grammar", MAX_GRAMMAR_BYTES).unwrap_err();
        assert!(e.to_string().contains("at most 256 deep"), "{e}");
    }

    #[test]
    fn repetitions_count_their_copies() {
        let ok = measure_gbnf("root ::= \"ab\"{3}");
        assert_eq!(ok.elements, 2 + 2 * 4);
        let big = "root ::= [a-z]{0,100000000}";
        let e = check_gbnf(big, "grammar", MAX_GRAMMAR_BYTES).unwrap_err();
        assert!(e.to_string().contains("grammar elements"), "{e}");
        // Groups are references: nesting repetitions adds, it does not multiply.
        let nested = measure_gbnf("root ::= ((\"a\"{100}){100}){100}");
        assert!(nested.elements < 1_000, "{nested:?}");
        assert!(check_gbnf("root ::= \"a\"{4294967296}", "grammar", MAX_GRAMMAR_BYTES).is_err());
    }

    #[test]
    fn alternatives_that_begin_with_rules_are_counted_as_llama_cpp_follows_them() {
        let doubled = |n: usize| {
            let chain: String = (0..n).map(|i| format!("r{i} ::= r{} | r{}\n", i + 1, i + 1)).collect();
            format!("root ::= r0\n{chain}r{n} ::= \"a\"\n")
        };
        assert_eq!(stacks_of(&doubled(10)), 1024);
        let e = check_gbnf(&doubled(26), "grammar", MAX_GRAMMAR_BYTES).unwrap_err().to_string();
        assert!(e.contains("parse stacks") && e.contains("67108864 stacks"), "{e}");
        // A chain of single references is one stack; characters first stop the count.
        let chain: String = (0..4000).map(|i| format!("r{i} ::= r{}\n", i + 1)).collect();
        assert_eq!(stacks_of(&format!("root ::= r0\n{chain}r4000 ::= \"a\"\n")), 1);
        assert_eq!(stacks_of("root ::= \"x\" r1 | \"y\" r1\nr1 ::= \"a\" | \"b\""), 2);
        // What may be empty lets the next symbols lead too.
        assert_eq!(stacks_of("root ::= [a-z]* (\"b\" | \"c\")? \"d\""), 4);
        // Left recursion, directly or through an empty symbol, is refused.
        assert_eq!(stacks_of("root ::= root \"a\" | \"a\""), u64::MAX);
        assert_eq!(stacks_of("root ::= x? root \"a\" | \"a\"\nx ::= \"b\""), u64::MAX);
        // Right recursion is fine.
        assert_eq!(stacks_of("root ::= \"a\" root | \"a\""), 2);
    }

    #[test]
    fn an_ordinary_grammar_passes() {
        let g = "root ::= answer\nanswer ::= (\"yes\" | \"no\") [.!]? # a comment ( ( (\n";
        let s = check_gbnf(g, "grammar", MAX_GRAMMAR_BYTES).unwrap();
        assert_eq!(s.nesting, 1);
    }

    #[test]
    fn schema_bounds_name_the_rule_and_where() {
        let long = json!({"type": "object", "properties": {"_".repeat(20_000): {"type": "string"}}});
        let e = check_schema(&long, "format").unwrap_err().to_string();
        assert!(e.starts_with("invalid format: ") && e.contains("at most 1000 characters"), "{e}");
        let names = |from: usize| -> serde_json::Map<String, Value> {
            (from..from + 65).map(|i| (format!("{i:0>1000}"), json!({"type": "string"}))).collect()
        };
        let many = json!({"type": "object", "properties": {"a": {"type": "object", "properties": names(0)},
                                                           "b": {"type": "object", "properties": names(65)}}});
        let e = check_schema(&many, "format").unwrap_err().to_string();
        assert!(e.contains("120000 characters"), "{e}");

        let props: serde_json::Map<String, Value> =
            (0..2000).map(|i| (format!("p{i}"), json!({"type": "string"}))).collect();
        let optional = json!({"type": "object", "properties": props});
        let e = check_schema(&optional, "json_schema").unwrap_err().to_string();
        assert!(e.contains("optional properties") && e.contains("2000"), "{e}");
        let keys: Vec<&String> = props.keys().collect();
        let required = json!({"type": "object", "properties": props, "required": keys});
        check_schema(&required, "json_schema").unwrap();

        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "object", "properties": {"a": deep}});
        }
        let e = check_schema(&deep, "response_format.json_schema.schema").unwrap_err().to_string();
        assert!(e.contains("64 deep"), "{e}");

        let many = json!({"type": "array", "minItems": 300_000, "items": {"type": "string"}});
        assert!(check_schema(&many, "format").unwrap_err().to_string().contains("minItems"));
        let remote = json!({"$ref": "https://example.com/s.json"});
        assert!(check_schema(&remote, "format").unwrap_err().to_string().contains("$ref"));
    }
}

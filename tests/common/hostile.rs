//! Grammars and JSON schemas built to hurt llama.cpp's recursive parsers
//! (deep nesting, long names, many properties, recursive `$ref`, large
//! enums, patterns, huge repetition counts), each sent the way a client
//! sends it, with what the server must do: refuse it naming the field, or
//! answer it. A fixed list, then a seeded random mix of the same moves. The
//! test suite and `benches/bounds.rs` both use it.
#![allow(dead_code)]

use serde_json::{json, Map, Value};

pub const CHAT: &str = "/v1/chat/completions";
pub const OLLAMA_CHAT: &str = "/api/chat";

/// What the server must do with a case.
#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// A 400 whose `param` (Ollama: whose message) names this field.
    Refused(&'static str),
    /// A 200.
    Answered,
    /// Either, as long as a refusal names one of the request's fields.
    Either,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub path: &'static str,
    pub body: Value,
    pub expect: Expect,
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{ "role": "user", "content": "Answer in JSON." }],
        "max_tokens": 1,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn ollama(format: Value) -> Value {
    json!({
        "model": "SmolLM2-135M-Instruct",
        "messages": [{ "role": "user", "content": "Answer in JSON." }],
        "format": format,
        "stream": false,
        "options": { "num_predict": 1, "temperature": 0 },
    })
}

fn schema_case(name: &str, schema: Value, expect: Expect) -> Case {
    let body = chat(json!({
        "response_format": { "type": "json_schema", "json_schema": { "name": "out", "schema": schema } }
    }));
    Case { name: name.into(), path: CHAT, body, expect }
}

fn object(props: Map<String, Value>, required: bool) -> Value {
    let keys: Vec<Value> = if required { props.keys().map(|k| json!(k)).collect() } else { Vec::new() };
    json!({ "type": "object", "properties": props, "required": keys })
}

fn props(n: usize, name: impl Fn(usize) -> String) -> Map<String, Value> {
    (0..n).map(|i| (name(i), json!({ "type": "string" }))).collect()
}

fn nested(levels: usize) -> Value {
    let mut s = json!({ "type": "string" });
    for _ in 0..levels {
        s = json!({ "type": "object", "properties": { "a": s }, "required": ["a"] });
    }
    s
}

const SCHEMA_FIELD: &str = "response_format.json_schema.schema";

/// The fixed cases: each bound just past its limit and at it.
pub fn fixed() -> Vec<Case> {
    let mut cases = Vec::new();
    let grammar = |name: &str, g: String, expect| Case {
        name: name.into(),
        path: CHAT,
        body: chat(json!({ "grammar": g })),
        expect,
    };
    cases.push(grammar(
        "grammar of 8,000 nested groups (16 KB)",
        format!("root ::= {}\"a\"{}", "(".repeat(8000), ")".repeat(8000)),
        Expect::Refused("grammar"),
    ));
    cases.push(grammar(
        "grammar of 200 nested groups",
        format!("root ::= {}\"a\"{}", "(".repeat(200), ")".repeat(200)),
        Expect::Answered,
    ));
    cases.push(grammar(
        "grammar repeating a class 10^8 times",
        "root ::= [a-z]{0,100000000}".into(),
        Expect::Refused("grammar"),
    ));
    cases.push(grammar(
        "grammar repeating a literal 2^32 times",
        "root ::= \"ab\"{4294967296}".into(),
        Expect::Refused("grammar"),
    ));
    let chain: String = (0..4000).map(|i| format!("r{i} ::= r{}\n", i + 1)).collect();
    cases.push(grammar(
        "grammar of a 4,000-rule chain",
        format!("root ::= r0\n{chain}r4000 ::= \"a\"\n"),
        Expect::Answered,
    ));
    cases.push(grammar(
        "grammar with left recursion",
        "root ::= root \"a\" | \"a\"".into(),
        Expect::Refused("grammar"),
    ));
    let doubled = |n: usize| -> String {
        let chain: String = (0..n).map(|i| format!("r{i} ::= r{} | r{}\n", i + 1, i + 1)).collect();
        format!("root ::= r0\n{chain}r{n} ::= \"a\"\n")
    };
    cases.push(grammar(
        "grammar whose alternatives double 40 times (2^40 parse stacks)",
        doubled(40),
        Expect::Refused("grammar"),
    ));
    cases.push(grammar("grammar whose alternatives double 13 times", doubled(13), Expect::Answered));
    cases.push(Case {
        name: "Ollama format with a 20,000-character property name".into(),
        path: OLLAMA_CHAT,
        body: ollama(json!({ "type": "object", "properties": { "_".repeat(20_000): { "type": "string" } } })),
        expect: Expect::Refused("format"),
    });
    cases.push(Case {
        name: "json_schema with 2,000 optional properties".into(),
        path: CHAT,
        body: chat(json!({ "json_schema": object(props(2000, |i| format!("p{i}")), false) })),
        expect: Expect::Refused("json_schema"),
    });
    cases.push(schema_case(
        "100 optional properties",
        object(props(100, |i| format!("p{i}")), false),
        Expect::Answered,
    ));
    cases.push(schema_case(
        "5,000 required properties",
        object(props(5000, |i| format!("p{i}")), true),
        Expect::Either,
    ));
    cases.push(schema_case(
        "5,001 properties",
        object(props(5001, |i| format!("p{i}")), true),
        Expect::Refused(SCHEMA_FIELD),
    ));
    cases.push(schema_case(
        "120 names of 1,000 characters",
        object(props(120, |i| format!("{i:0>1000}")), true),
        Expect::Answered,
    ));
    cases.push(schema_case("objects nested 40 deep", nested(40), Expect::Refused(SCHEMA_FIELD)));
    cases.push(schema_case("objects nested 30 deep", nested(30), Expect::Answered));
    cases.push(schema_case(
        "a recursive $ref",
        json!({
            "$defs": { "node": { "type": "object", "properties": { "v": { "type": "integer" }, "next": { "$ref": "#/$defs/node" } }, "required": ["v"] } },
            "$ref": "#/$defs/node"
        }),
        Expect::Answered,
    ));
    cases.push(schema_case(
        "a $ref to another host",
        json!({ "$ref": "https://example.com/schema.json" }),
        Expect::Refused(SCHEMA_FIELD),
    ));
    let values = |n: usize, len: usize| -> Vec<Value> { (0..n).map(|i| json!(format!("{i:x>len$}"))).collect() };
    cases.push(schema_case(
        "an enum of 1,001 values",
        json!({ "enum": values(1001, 4) }),
        Expect::Refused(SCHEMA_FIELD),
    ));
    cases.push(schema_case(
        "an enum of 1,000 values of 100 characters",
        json!({ "enum": values(1000, 100) }),
        Expect::Answered,
    ));
    cases.push(schema_case(
        "a pattern of 1,001 characters",
        json!({ "type": "string", "pattern": format!("^{}$", "a".repeat(999)) }),
        Expect::Refused(SCHEMA_FIELD),
    ));
    cases.push(schema_case(
        "a pattern of 400 nested groups",
        json!({ "type": "string", "pattern": format!("^{}a{}$", "(".repeat(400), ")".repeat(400)) }),
        Expect::Either,
    ));
    cases.push(schema_case(
        "minItems 300,000",
        json!({ "type": "array", "items": { "type": "string" }, "minItems": 300_000 }),
        Expect::Refused(SCHEMA_FIELD),
    ));
    cases.push(schema_case(
        "maxItems 10,000",
        json!({ "type": "array", "items": { "type": "integer" }, "maxItems": 10_000 }),
        Expect::Either,
    ));
    cases.push(schema_case(
        "maxLength 10,000 in 60 properties",
        object((0..60).map(|i| (format!("p{i}"), json!({ "type": "string", "maxLength": 10_000 }))).collect(), true),
        Expect::Either,
    ));
    cases.push(Case {
        name: "a tool whose parameters have a 5,000-character property name".into(),
        path: CHAT,
        body: chat(json!({
            "tools": [{ "type": "function", "function": { "name": "f", "parameters": object(props(1, |_| "n".repeat(5000)), true) } }],
            "tool_choice": "required",
        })),
        expect: Expect::Refused("tools[0].function.parameters"),
    });
    cases
}

/// A small deterministic generator (no dependency, same cases on every machine).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1)
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// A number in `0..n`, skewed towards small ones half of the time.
    pub fn below(&mut self, n: u64) -> u64 {
        let v = self.next() % n.max(1);
        if self.next() % 2 == 0 {
            v / (1 + self.next() % 64)
        } else {
            v
        }
    }
}

/// One random schema node of at most `depth` levels and `budget` nodes.
fn random_schema(r: &mut Rng, depth: usize, budget: &mut usize) -> Value {
    *budget = budget.saturating_sub(1);
    match if depth == 0 || *budget == 0 { 5 } else { r.next() % 8 } {
        0 | 1 => {
            let n = r.below(400) as usize;
            let name_len = 1 + r.below(1500) as usize;
            let props: Map<String, Value> =
                (0..n).map(|i| (format!("{i}{}", "k".repeat(name_len)), random_schema(r, depth - 1, budget))).collect();
            let required = r.next() % 2 == 0;
            object(props, required)
        }
        2 => {
            json!({ "type": "array", "items": random_schema(r, depth - 1, budget), "minItems": r.below(20_000), "maxItems": 20_000 + r.below(20_000) })
        }
        3 => json!({ "anyOf": [random_schema(r, depth - 1, budget), random_schema(r, depth - 1, budget)] }),
        4 => {
            let n = 1 + r.below(1500) as usize;
            let len = 1 + r.below(300) as usize;
            json!({ "enum": (0..n).map(|i| json!(format!("{i}{}", "e".repeat(len)))).collect::<Vec<_>>() })
        }
        5 => json!({ "type": "string", "maxLength": r.below(20_000) }),
        6 => {
            let groups = r.below(600) as usize;
            json!({ "type": "string", "pattern": format!("^{}[a-z]{{1,{}}}{}$", "(".repeat(groups), r.below(5000), ")".repeat(groups)) })
        }
        _ => json!({ "type": "integer", "minimum": -(r.below(1 << 40) as i64), "maximum": r.below(1 << 40) }),
    }
}

/// `n` random cases from `seed`: random schemas (some within the bounds,
/// most past one) and random grammars, on the OpenAI and Ollama routes.
pub fn random(seed: u64, n: usize) -> Vec<Case> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|i| {
            let kind = r.next() % 4;
            if kind == 3 {
                let g = if r.next() % 2 == 0 {
                    let depth = r.below(1000) as usize;
                    let reps = r.below(1_000_000);
                    format!("root ::= {}[a-z]{{0,{reps}}}{} \"x\"*", "(".repeat(depth), ")".repeat(depth))
                } else {
                    // Rules whose alternatives begin with the next rule, some
                    // optional: the parse stacks multiply per level.
                    let (levels, width) = (1 + r.below(40) as usize, 1 + r.below(4) as usize);
                    let rules: String = (0..levels)
                        .map(|l| {
                            let alt = |k: usize| {
                                if k % 2 == 1 {
                                    format!("r{}? \"{k}\"", l + 1)
                                } else {
                                    format!("r{}", l + 1)
                                }
                            };
                            format!("r{l} ::= {}\n", (0..width).map(alt).collect::<Vec<_>>().join(" | "))
                        })
                        .collect();
                    format!("root ::= r0\n{rules}r{levels} ::= [a-z]\n")
                };
                return Case {
                    name: format!("random grammar {i}"),
                    path: CHAT,
                    body: chat(json!({ "grammar": g })),
                    expect: Expect::Either,
                };
            }
            let depth = 1 + r.below(12) as usize;
            let schema = random_schema(&mut r, depth, &mut 3000);
            if kind == 2 {
                Case {
                    name: format!("random Ollama format {i}"),
                    path: OLLAMA_CHAT,
                    body: ollama(schema),
                    expect: Expect::Either,
                }
            } else {
                schema_case(&format!("random schema {i}"), schema, Expect::Either)
            }
        })
        .collect()
}

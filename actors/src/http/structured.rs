//! Structured output: the request fields that constrain a reply to a JSON
//! schema or a grammar. OpenAI's `response_format` (`json_object`,
//! `json_schema`), llama-server's `json_schema` and `grammar`; `/chat` takes
//! `response_format` too. Each is checked here against the bounds of
//! [`crate::engine::grammar`] (cheap, no parser runs); llama.cpp converts
//! and parses it later, off the HTTP workers.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::error::ApiError;
use super::kit::short_json;
use crate::engine::grammar::{check_gbnf, check_schema, JsonSchema, MAX_GRAMMAR_BYTES};
use crate::params::SamplingParams;

/// What a reply must follow: a GBNF grammar, or a JSON schema.
#[derive(Clone, Debug)]
pub enum Constraint {
    Grammar(String),
    Schema(JsonSchema),
}

impl Constraint {
    /// Puts the constraint on `sampling` (replacing any other).
    pub fn apply(self, sampling: &mut SamplingParams) {
        match self {
            Constraint::Grammar(g) => {
                sampling.grammar = Some(g);
                sampling.json_schema = None;
            }
            Constraint::Schema(s) => {
                sampling.grammar = None;
                sampling.json_schema = Some(s);
            }
        }
    }
}

/// The constraint the fields in `fields` ask for (none: free text). Each is
/// named in its error; giving more than one is refused.
pub fn grammar_of(fields: &HashMap<String, Value>) -> Result<Option<Constraint>, ApiError> {
    let mut asked: Vec<(&str, Constraint)> = Vec::new();
    if let Some(format) = fields.get("response_format").filter(|v| !v.is_null()) {
        if let Some(g) = response_format(format)? {
            asked.push(("response_format", g));
        }
    }
    // `{}` and "" ask for nothing; any other value is checked (a JSON schema
    // is an object or a boolean; a grammar is GBNF text).
    if let Some(schema) =
        fields.get("json_schema").filter(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
    {
        asked.push(("json_schema", schema_grammar(schema, "json_schema")?));
    }
    if let Some(g) = fields.get("grammar").filter(|v| !v.is_null() && *v != "") {
        let Some(text) = g.as_str() else {
            return Err(ApiError::bad(
                "grammar",
                format!("invalid grammar: must be a GBNF string, got {}", short_json(g)),
            ));
        };
        check_gbnf(text, "grammar", MAX_GRAMMAR_BYTES)?;
        asked.push(("grammar", Constraint::Grammar(text.to_string())));
    }
    if asked.len() > 1 {
        let names: Vec<&str> = asked.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::bad(
            asked[1].0,
            format!(
                "invalid {}: give only one of response_format, json_schema and grammar, got {}",
                asked[1].0,
                names.join(" and ")
            ),
        ));
    }
    Ok(asked.pop().map(|(_, g)| g))
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}`
/// (any object; llama-server's `schema` beside it is honoured), or
/// `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}, "strict": …}}`.
pub fn response_format(format: &Value) -> Result<Option<Constraint>, ApiError> {
    let bad = |rule: &str| {
        ApiError::bad("response_format", format!("invalid response_format: {rule}, got {}", short_json(format)))
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => {
            let schema = format.get("schema").filter(|v| !is_empty(v)).cloned().unwrap_or(json!({ "type": "object" }));
            schema_grammar(&schema, "response_format.schema").map(Some)
        }
        Some("json_schema") => {
            let spec = format.get("json_schema");
            // What the reply does not depend on still has its type.
            for (key, is_type, rule) in [
                ("name", Value::is_string as fn(&Value) -> bool, "json_schema.name must be a string"),
                ("description", Value::is_string, "json_schema.description must be a string"),
                ("strict", Value::is_boolean, "json_schema.strict must be true or false"),
            ] {
                if spec.and_then(|j| j.get(key)).is_some_and(|v| !v.is_null() && !is_type(v)) {
                    return Err(bad(rule));
                }
            }
            let schema = spec
                .and_then(|j| j.get("schema"))
                .filter(|v| v.is_object() || v.is_boolean())
                .ok_or_else(|| bad("json_schema.schema must be a JSON schema object"))?;
            schema_grammar(schema, "response_format.json_schema.schema").map(Some)
        }
        _ => Err(bad("type must be text, json_object or json_schema")),
    }
}

/// A JSON schema as a constraint, once it is within the bounds (llama.cpp's
/// converter, as llama-server uses, turns it into a grammar later); a
/// schema outside them is the client's error.
pub fn schema_grammar(schema: &Value, field: &str) -> Result<Constraint, ApiError> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(ApiError::bad(
            field,
            format!("invalid {field}: must be a JSON schema object, got {}", short_json(schema)),
        ));
    }
    check_schema(schema, field)?;
    Ok(Constraint::Schema(JsonSchema { field: field.to_string(), schema: schema.clone(), parts: Vec::new() }))
}

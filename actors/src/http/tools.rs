//! Tool calls on `/v1/chat/completions`, in the generic JSON form that
//! llama-server uses for templates without a tool syntax of their own: the
//! tools are described in a system message, the reply is constrained by a
//! grammar to `{"tool_call": {"name": …, "arguments": {…}}}` (or
//! `{"tool_calls": [...]}` with `parallel_tool_calls`, or `{"response": "…"}`
//! where `tool_choice` lets the model answer), and the reply is parsed back
//! into OpenAI's `tool_calls`. Earlier calls and tool results in the history
//! are written in the same form, so the model sees what it wrote.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::error::ApiError;
use super::kit::short_json;
use super::structured::schema_grammar;
use crate::params::Role;

/// Most tools one request may describe (OpenAI's bound).
pub const MAX_TOOLS: usize = 128;

/// One function the model may call.
#[derive(Clone, Debug)]
pub struct ToolDef {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
}

/// OpenAI's `tool_choice`.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    /// No call: the tools are not offered, the reply is free text.
    None,
    /// A call or an answer, as the model decides.
    Auto,
    /// A call to one of the tools.
    Required,
    /// A call to this tool.
    Named(String),
}

/// A request's tools and how they may be used.
#[derive(Clone, Debug)]
pub struct Tools {
    pub defs: Vec<ToolDef>,
    pub choice: Choice,
    /// Several calls in one reply (`{"tool_calls": [...]}`); off by default, as in llama-server.
    pub parallel: bool,
    /// [`Self::schema`] as a constraint, checked once.
    grammar: super::structured::Constraint,
}

/// One parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's shape, with `index` where it is a stream's `delta.tool_calls`.
    pub fn openai(&self, index: Option<usize>) -> Value {
        let mut call = json!({ "id": self.id, "type": "function", "function": { "name": self.name, "arguments": self.arguments } });
        if let Some(i) = index {
            call["index"] = Value::from(i);
        }
        call
    }

    /// Ollama's shape: the arguments as an object.
    pub fn ollama(&self) -> Value {
        let arguments = serde_json::from_str::<Value>(&self.arguments).unwrap_or_else(|_| json!({}));
        json!({ "function": { "name": self.name, "arguments": arguments } })
    }
}

/// What a reply generated under [`Tools`] says.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Calls(Vec<ToolCall>),
    Text(String),
}

fn bad(field: &str, rule: &str, got: &Value) -> ApiError {
    ApiError::bad(field, format!("invalid {field}: {rule}, got {}", short_json(got)))
}

/// The request's `tools`, `tool_choice` and `parallel_tool_calls` (none: no
/// tools given, or `tool_choice` `none` with none given). OpenAI's older
/// `functions`/`function_call` are refused with a pointer to `tools`.
pub fn tools_of(fields: &HashMap<String, Value>) -> Result<Option<Tools>, ApiError> {
    for old in ["functions", "function_call"] {
        if let Some(v) = fields.get(old).filter(|v| !v.is_null()) {
            return Err(bad(
                old,
                "the deprecated function-calling fields are not supported; send tools and tool_choice",
                v,
            ));
        }
    }
    let defs = match fields.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            if list.len() > MAX_TOOLS {
                return Err(ApiError::bad(
                    "tools",
                    format!("invalid tools: at most {MAX_TOOLS} tools, got {}", list.len()),
                ));
            }
            list.iter().enumerate().map(|(i, t)| tool_def(i, t)).collect::<Result<Vec<_>, _>>()?
        }
        Some(other) => {
            return Err(bad("tools", "must be an array of {\"type\": \"function\", \"function\": {…}}", other))
        }
    };
    for (i, d) in defs.iter().enumerate() {
        if defs[..i].iter().any(|e| e.name == d.name) {
            return Err(ApiError::bad(
                &format!("tools[{i}].function.name"),
                format!("invalid tools[{i}].function.name: names must be unique, got {:?} twice", d.name),
            ));
        }
    }
    let choice = match fields.get("tool_choice") {
        None | Some(Value::Null) => {
            if defs.is_empty() {
                Choice::None
            } else {
                Choice::Auto
            }
        }
        Some(Value::String(s)) if s == "none" => Choice::None,
        Some(Value::String(s)) if s == "auto" => Choice::Auto,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(v @ Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}",
                        v,
                    )
                })?;
            if !defs.iter().any(|d| d.name == name) {
                return Err(bad("tool_choice", "must name one of the tools", v));
            }
            Choice::Named(name.to_string())
        }
        Some(v) => {
            return Err(bad(
                "tool_choice",
                "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}",
                v,
            ))
        }
    };
    if defs.is_empty() && choice != Choice::None {
        let v = fields.get("tool_choice").cloned().unwrap_or(Value::Null);
        return Err(bad("tool_choice", "needs tools to choose from", &v));
    }
    let parallel = match fields.get("parallel_tool_calls") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad("parallel_tool_calls", "must be true or false", v)),
    };
    if choice == Choice::None {
        return Ok(None);
    }
    // Each tool's schema within the bounds (the error names the tool), then
    // all of them together, as the one schema of a reply.
    for (i, d) in defs.iter().enumerate() {
        schema_grammar(&d.parameters, &format!("tools[{i}].function.parameters"))?;
    }
    let mut tools = Tools { defs, choice, parallel, grammar: super::structured::Constraint::Grammar(String::new()) };
    let schema: Value = serde_json::from_str(&tools.schema())
        .map_err(|e| ApiError::Internal(format!("the tools' schema is not JSON: {e}")))?;
    tools.grammar = match schema_grammar(&schema, "tools")? {
        super::structured::Constraint::Schema(mut s) => {
            s.parts = tools
                .defs
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("tools[{i}].function.parameters"), d.parameters.clone()))
                .collect();
            super::structured::Constraint::Schema(s)
        }
        grammar => grammar,
    };
    Ok(Some(tools))
}

fn tool_def(i: usize, t: &Value) -> Result<ToolDef, ApiError> {
    let field = format!("tools[{i}]");
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(&format!("{field}.type"), "must be \"function\"", t.get("type").unwrap_or(&Value::Null)));
    }
    let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| {
        bad(&format!("{field}.function"), "must be an object with name, description and parameters", t)
    })?;
    let name = f.get("name").cloned().unwrap_or(Value::Null);
    let valid_name = name.as_str().filter(|n| {
        !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    });
    let Some(name) = valid_name else {
        return Err(bad(&format!("{field}.function.name"), "must be 1 to 64 letters, digits, _ or -", &name));
    };
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(bad(&format!("{field}.function.description"), "must be a string", v)),
    };
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({ "type": "object", "properties": {} }),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(v) => return Err(bad(&format!("{field}.function.parameters"), "must be a JSON schema object", v)),
    };
    Ok(ToolDef { name: name.to_string(), description, parameters })
}

impl Tools {
    fn offered(&self) -> impl Iterator<Item = &ToolDef> {
        self.defs.iter().filter(move |d| match &self.choice {
            Choice::Named(n) => &d.name == n,
            _ => true,
        })
    }

    /// The JSON schema the reply must follow, written by hand so that `name`
    /// comes before `arguments` (the model picks the tool, then fills it in).
    fn schema(&self) -> String {
        let calls: Vec<String> = self
            .offered()
            .map(|d| {
                format!(
                    r#"{{"type":"object","properties":{{"name":{{"const":{}}},"arguments":{}}},"required":["name","arguments"],"additionalProperties":false}}"#,
                    Value::from(d.name.as_str()),
                    d.parameters
                )
            })
            .collect();
        let call = if calls.len() == 1 { calls[0].clone() } else { format!(r#"{{"anyOf":[{}]}}"#, calls.join(",")) };
        let wrapped = if self.parallel {
            format!(
                r#"{{"type":"object","properties":{{"tool_calls":{{"type":"array","items":{call},"minItems":1}}}},"required":["tool_calls"],"additionalProperties":false}}"#
            )
        } else {
            format!(
                r#"{{"type":"object","properties":{{"tool_call":{call}}},"required":["tool_call"],"additionalProperties":false}}"#
            )
        };
        match self.choice {
            Choice::Auto => format!(
                r#"{{"anyOf":[{wrapped},{{"type":"object","properties":{{"response":{{"type":"string"}}}},"required":["response"],"additionalProperties":false}}]}}"#
            ),
            _ => wrapped,
        }
    }

    /// The constraint ([`Self::schema`]) that holds the reply to a call.
    pub fn grammar(&self) -> super::structured::Constraint {
        self.grammar.clone()
    }

    /// The system text that describes the tools and the reply's form.
    pub fn instructions(&self) -> String {
        let list: Vec<Value> = self
            .offered()
            .map(|d| {
                let mut v = json!({ "name": d.name, "parameters": d.parameters });
                if let Some(desc) = &d.description {
                    v["description"] = Value::from(desc.as_str());
                }
                v
            })
            .collect();
        let call_form = if self.parallel {
            r#"{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}, ...]}"#
        } else {
            r#"{"tool_call": {"name": "<tool name>", "arguments": {<its arguments>}}}"#
        };
        let how = match &self.choice {
            Choice::Auto => format!(
                "Respond in JSON, either with {call_form} to call a tool, or with {{\"response\": \"<your answer>\"}} to answer the user. \
                 Once a tool_response gives what the user asked for, answer with a response."
            ),
            Choice::Named(n) => format!("Call the tool {n:?}. Respond in JSON: {call_form}"),
            _ => format!("Call one of the tools. Respond in JSON: {call_form}"),
        };
        format!(
            "You can call the following tools:\n{}\n\n{how}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        )
    }
}

/// A fresh call id, in OpenAI's form.
pub fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

/// Reads a reply generated under [`Tools`]: its calls, or its answer. A
/// reply that does not parse (cut off by `max_tokens`) is returned as text.
pub fn parse_reply(text: &str) -> Reply {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else {
        return Reply::Text(text.to_string());
    };
    let call = |v: &Value| -> Option<ToolCall> {
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = v.get("arguments").cloned().unwrap_or_else(|| json!({})).to_string();
        Some(ToolCall { id: call_id(), name, arguments })
    };
    if let Some(c) = o.get("tool_call").and_then(call) {
        return Reply::Calls(vec![c]);
    }
    if let Some(list) = o.get("tool_calls").and_then(Value::as_array) {
        let calls: Option<Vec<ToolCall>> = list.iter().map(call).collect();
        if let Some(calls) = calls.filter(|c| !c.is_empty()) {
            return Reply::Calls(calls);
        }
    }
    if let Some(r) = o.get("response").and_then(Value::as_str) {
        return Reply::Text(r.to_string());
    }
    Reply::Text(text.to_string())
}

/// An assistant message's `tool_calls` written as the model writes them
/// (after its text, if any); the ids are remembered for the tool results.
pub fn assistant_text(
    i: usize,
    text: String,
    calls: &Value,
    names: &mut HashMap<String, String>,
) -> Result<String, ApiError> {
    let field = format!("messages[{i}].tool_calls");
    let list = calls
        .as_array()
        .filter(|l| l.len() <= MAX_TOOLS)
        .ok_or_else(|| bad(&field, "must be an array of at most 128 calls", calls))?;
    let mut written = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let f = c.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str).filter(|n| !n.is_empty());
        let Some(name) = name else {
            return Err(bad(&format!("{field}[{j}].function.name"), "must be a non-empty string", c));
        };
        let args = f.and_then(|f| f.get("arguments")).cloned().unwrap_or(Value::Null);
        let arguments = match &args {
            Value::String(s) => serde_json::from_str::<Value>(s).map_err(|_| {
                bad(&format!("{field}[{j}].function.arguments"), "must be a JSON object written as a string", &args)
            })?,
            Value::Object(_) => args.clone(),
            Value::Null => json!({}),
            _ => {
                return Err(bad(
                    &format!("{field}[{j}].function.arguments"),
                    "must be a JSON object written as a string",
                    &args,
                ))
            }
        };
        if let Some(id) = c.get("id").and_then(Value::as_str) {
            names.insert(id.to_string(), name.to_string());
        }
        written.push(json!({ "name": name, "arguments": arguments }));
    }
    let json = match written.len() {
        1 => json!({ "tool_call": written.pop() }),
        _ => json!({ "tool_calls": written }),
    };
    Ok(if text.is_empty() { json.to_string() } else { format!("{text}\n{json}") })
}

/// A message's role as the model reads it: a tool's result is data the
/// client fetched, a user turn. `developer` (OpenAI's newer name for system)
/// where the API has it.
pub fn message_role(i: usize, role: &str, with_developer: bool) -> Result<Role, ApiError> {
    match role {
        "system" => Ok(Role::System),
        "developer" if with_developer => Ok(Role::System),
        "user" | "tool" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => Err(ApiError::bad(
            &format!("messages[{i}].role"),
            format!(
                "invalid messages[{i}].role: must be system, {}user, assistant or tool, got {other:?}",
                if with_developer { "developer, " } else { "" }
            ),
        )),
    }
}

/// A `tool` message's result, written as the user turn that carries it; the
/// tool is named by the call it answers (OpenAI) or by itself (Ollama's `tool_name`).
pub fn tool_result_text(
    content: String,
    call_id: Option<&str>,
    tool_name: Option<&str>,
    names: &HashMap<String, String>,
) -> String {
    let mut response = json!({ "content": content });
    if let Some(id) = call_id {
        response["tool_call_id"] = Value::from(id);
    }
    if let Some(name) = tool_name.or_else(|| call_id.and_then(|id| names.get(id)).map(String::as_str)) {
        response["tool"] = Value::from(name);
    }
    json!({ "tool_response": response }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_read_as_each_api_names_them() {
        assert_eq!(message_role(0, "tool", false).unwrap(), Role::User, "a tool's result is a user turn");
        assert_eq!(message_role(0, "developer", true).unwrap(), Role::System);
        let e = message_role(3, "developer", false).unwrap_err().to_string();
        assert!(
            e.contains("messages[3].role")
                && e.contains("system, user, assistant or tool")
                && e.contains("\"developer\""),
            "{e}"
        );
        let e = message_role(1, "robot", true).unwrap_err().to_string();
        assert!(e.contains("system, developer, user, assistant or tool, got \"robot\""), "{e}");
    }

    fn fields(v: Value) -> HashMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    fn weather() -> Value {
        json!([{ "type": "function", "function": { "name": "get_weather", "description": "Weather of a city",
            "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } },
            { "type": "function", "function": { "name": "get_time", "parameters": { "type": "object",
            "properties": { "zone": { "type": "string", "enum": ["UTC", "CET"] } }, "required": ["zone"] } } }])
    }

    #[test]
    fn choices_and_refusals_name_the_field() {
        let t = tools_of(&fields(json!({ "tools": weather() }))).unwrap().unwrap();
        assert_eq!(t.choice, Choice::Auto);
        assert!(!t.parallel);
        assert!(tools_of(&fields(json!({ "tools": weather(), "tool_choice": "none" }))).unwrap().is_none());
        assert!(tools_of(&fields(json!({}))).unwrap().is_none());
        let named =
            json!({ "tools": weather(), "tool_choice": { "type": "function", "function": { "name": "get_time" } } });
        assert_eq!(tools_of(&fields(named)).unwrap().unwrap().choice, Choice::Named("get_time".into()));
        let cases: [(Value, &str); 6] = [
            (
                json!({ "tools": weather(), "tool_choice": { "type": "function", "function": { "name": "nope" } } }),
                "tool_choice",
            ),
            (json!({ "tool_choice": "required" }), "tool_choice"),
            (json!({ "tools": [{ "type": "function", "function": { "name": "a b" } }] }), "tools[0].function.name"),
            (json!({ "tools": [{ "type": "retrieval" }] }), "tools[0].type"),
            (json!({ "tools": weather(), "parallel_tool_calls": "yes" }), "parallel_tool_calls"),
            (json!({ "functions": [] }), "functions"),
        ];
        for (body, param) in cases {
            match tools_of(&fields(body.clone())) {
                Err(ApiError::BadRequest { param: got, .. }) => assert_eq!(got.as_deref(), Some(param), "{body}"),
                other => panic!("{body}: expected a 400 naming {param}, got {other:?}"),
            }
        }
        // A schema llama.cpp cannot convert is found when the request is
        // prepared (off the HTTP workers), and the tool is named.
        let unresolved = json!({ "tools": [weather()[0].clone(), { "type": "function", "function": { "name": "x", "parameters": { "$ref": "#/nowhere" } } }] });
        let tools = tools_of(&fields(unresolved)).unwrap().unwrap();
        let super::super::structured::Constraint::Schema(schema) = tools.grammar() else { panic!("a schema") };
        match crate::engine::grammar::schema_to_gbnf(&schema) {
            Err(crate::error::EngineError::Refused { field, .. }) => assert_eq!(field, "tools[1].function.parameters"),
            other => panic!("expected a refusal naming the tool, got {other:?}"),
        }
    }

    #[test]
    fn the_grammar_puts_the_name_first_and_parses() {
        let t = tools_of(&fields(json!({ "tools": weather(), "tool_choice": "required" }))).unwrap().unwrap();
        let schema = t.schema();
        assert!(schema.find("\"name\"").unwrap() < schema.find("\"arguments\"").unwrap());
        assert!(!schema.contains("response"));
        match t.grammar() {
            super::super::structured::Constraint::Schema(s) => assert!(s.schema.to_string().contains("get_weather")),
            other => panic!("expected the tools' schema, got {other:?}"),
        }
        let gbnf = crate::engine::grammar::schema_to_gbnf(&match t.grammar() {
            super::super::structured::Constraint::Schema(s) => s,
            _ => unreachable!(),
        })
        .unwrap();
        assert!(gbnf.contains("get_weather"));
        let auto = tools_of(&fields(json!({ "tools": weather() }))).unwrap().unwrap();
        assert!(auto.schema().contains("\"response\""));
        assert!(auto.instructions().contains("Weather of a city"));
    }

    #[test]
    fn replies_and_history_round_trip() {
        match parse_reply(r#"{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}"#) {
            Reply::Calls(c) => {
                assert_eq!(c[0].name, "get_weather");
                assert_eq!(serde_json::from_str::<Value>(&c[0].arguments).unwrap(), json!({ "city": "Oslo" }));
                assert!(c[0].id.starts_with("call_"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_reply(r#"{"response": "Hi"}"#), Reply::Text("Hi".into()));
        assert_eq!(parse_reply(r#"{"tool_call": {"na"#), Reply::Text(r#"{"tool_call": {"na"#.into()));
        let mut names = HashMap::new();
        let calls = json!([{ "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}" } }]);
        let text = assistant_text(1, String::new(), &calls, &mut names).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({ "tool_call": { "name": "get_weather", "arguments": { "city": "Oslo" } } })
        );
        let result = tool_result_text("12 °C".into(), Some("call_1"), None, &names);
        assert!(result.contains("\"tool\":\"get_weather\"") && result.contains("12 °C"));
        let broken = json!([{ "id": "c", "function": { "name": "f", "arguments": "{not json" } }]);
        assert!(matches!(assistant_text(2, String::new(), &broken, &mut names),
            Err(ApiError::BadRequest { param: Some(p), .. }) if p == "messages[2].tool_calls[0].function.arguments"));
    }
}

//! Ollama's request bodies, and their `options` and `format` turned into
//! this server's sampling parameters; fields that would change the answer
//! and are not honoured are refused here, by name.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::error::ApiError;
use crate::http::kit::{check_model, short_json, whole, ApiState};
use crate::http::pipeline::{self, Sampling};
use crate::params::SamplingParams;

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OllamaChatMessage)]
pub struct Message {
    #[schema(pattern = "^(system|user|assistant|tool)$")]
    pub role: String,
    #[serde(default)]
    pub content: String,
    #[schema(schema_with = crate::http::openapi::extras::empty_list)]
    pub images: Option<Vec<Value>>,
    pub tool_calls: Option<Value>,
    /// A `tool` message's tool.
    pub tool_name: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OllamaChatRequest)]
pub struct ChatBody {
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Vec<Message>,
    pub tools: Option<Value>,
    /// `"json"`, or a JSON schema the reply follows.
    pub format: Option<Value>,
    #[schema(value_type = Option<crate::http::openapi::extras::OllamaOptions>)]
    pub options: Option<HashMap<String, Value>>,
    pub stream: Option<bool>,
    /// The model stays loaded whatever it says: accepted.
    pub keep_alive: Option<Value>,
    #[schema(schema_with = crate::http::openapi::extras::no_thinking)]
    pub think: Option<Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = OllamaGenerateRequest)]
pub struct GenerateBody {
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: String,
    pub system: Option<String>,
    #[schema(schema_with = crate::http::openapi::extras::empty_string)]
    pub suffix: Option<String>,
    #[schema(schema_with = crate::http::openapi::extras::empty_string)]
    pub template: Option<String>,
    #[schema(schema_with = crate::http::openapi::extras::empty_list)]
    pub context: Option<Vec<Value>>,
    #[schema(schema_with = crate::http::openapi::extras::empty_list)]
    pub images: Option<Vec<Value>>,
    /// `"json"`, or a JSON schema the reply follows.
    pub format: Option<Value>,
    #[schema(value_type = Option<crate::http::openapi::extras::OllamaOptions>)]
    pub options: Option<HashMap<String, Value>>,
    pub stream: Option<bool>,
    #[schema(schema_with = crate::http::openapi::extras::no)]
    pub raw: Option<bool>,
    pub keep_alive: Option<Value>,
    #[schema(schema_with = crate::http::openapi::extras::no_thinking)]
    pub think: Option<Value>,
}

/// `model` as Ollama clients write it: a name, maybe with `:latest`.
pub(super) fn check_name(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    check_model(asked.map(|m| m.strip_suffix(":latest").unwrap_or(m)), served)
}

pub(super) fn refuse(field: &str, rule: &str, got: &Value) -> ApiError {
    ApiError::bad(field, format!("invalid {field}: {rule}, got {}", short_json(got)))
}

/// Fields that would change the answer and are not honoured: present and
/// not empty or false is a 400 naming them.
pub(super) fn refuse_set(field: &str, v: Option<&Value>, rule: &str) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(other) => Err(refuse(field, rule, other)),
    }
}

/// `options` and `format` onto the sampling parameters; the flag says
/// `num_predict` < 0 (to the end of the context).
pub(super) fn sampling_of(
    state: &ApiState,
    options: Option<&HashMap<String, Value>>,
    format: Option<&Value>,
) -> Result<(SamplingParams, bool), ApiError> {
    let empty = HashMap::new();
    let o = options.unwrap_or(&empty);
    let number = |key: &str| -> Result<Option<f64>, ApiError> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| refuse(&format!("options.{key}"), "must be a number", v)),
        }
    };
    // Samplers this server does not run: only their neutral values pass.
    for (key, neutral) in [("mirostat", 0.0), ("tfs_z", 1.0), ("typical_p", 1.0)] {
        if let Some(v) = number(key)?.filter(|v| *v != neutral) {
            return Err(ApiError::bad(
                &format!("options.{key}"),
                format!("invalid options.{key}: not supported by this server (only {neutral}), got {v}"),
            ));
        }
    }
    let n_ctx = state.chat()?.pool().options().instance.n_ctx;
    match o.get("num_ctx") {
        None | Some(Value::Null) => {}
        Some(v) => match whole(v) {
            None => return Err(refuse("options.num_ctx", "must be a whole number", v)),
            Some(n) if n > n_ctx as i64 => {
                return Err(ApiError::bad(
                    "options.num_ctx",
                    format!("invalid options.num_ctx: at most this server's context of n_ctx={n_ctx} tokens, got {n}"),
                ))
            }
            Some(_) => {}
        },
    }
    let (fields, to_the_end) = Sampling::from_ollama_options(o)?;
    let mut s = pipeline::sampling(state, fields, "options.num_predict")?;
    let constraint = match format {
        None | Some(Value::Null) => None,
        Some(Value::String(f)) if f.is_empty() => None,
        Some(Value::String(f)) if f == "json" => {
            crate::http::structured::response_format(&json!({ "type": "json_object" }))?
        }
        Some(schema @ Value::Object(_)) => Some(crate::http::structured::schema_grammar(schema, "format")?),
        Some(other) => return Err(refuse("format", "must be \"json\" or a JSON schema object", other)),
    };
    if let Some(c) = constraint {
        c.apply(&mut s);
    }
    Ok((s, to_the_end))
}

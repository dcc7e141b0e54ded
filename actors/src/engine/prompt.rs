//! Chat prompt → tokens, with the model's own chat template: the GGUF's Jinja
//! `tokenizer.chat_template`, rendered with minijinja as the model's authors
//! wrote it (and as llama-server renders it), or, for a template minijinja
//! cannot render, llama.cpp's built-in approximation. Message content is
//! tokenized without special-token parsing, so a user who types
//! `<|im_start|>` gets those characters, not a new turn; only the markers the
//! template itself writes are special.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::error::EngineError;
use crate::params::ChatMessage;

/// A private-use marker that stands in for message `i` while the template is
/// applied; it cannot come from a tokenizer's special tokens.
fn placeholder(i: usize) -> String {
    format!("\u{E000}{i}\u{E001}")
}

/// How a model's prompts are rendered.
pub enum ChatTemplate {
    /// The GGUF's own Jinja template.
    Jinja { env: minijinja::Environment<'static>, bos: String, eos: String },
    /// llama.cpp's built-in template chosen from the GGUF's (or "chatml").
    Builtin(String),
}

#[derive(Serialize)]
struct JinjaMessage<'a> {
    role: &'a str,
    content: String,
}

/// The text of a special token, as the template expects it (`bos_token`).
fn special_text(model: &LlamaModel, token: LlamaToken) -> String {
    if token.0 < 0 {
        return String::new();
    }
    let mut bytes = Vec::new();
    model.vocab().token_to_piece_into(token, &mut bytes, true, None);
    String::from_utf8_lossy(&bytes).into_owned()
}

impl ChatTemplate {
    /// The model's template: its Jinja source when minijinja renders it (a
    /// trial conversation must come out with every message in order), else
    /// llama.cpp's built-in one, with a warning.
    pub fn from_model(model: &LlamaModel) -> Self {
        let Some(source) = model.chat_template(None).ok().and_then(|t| t.to_string().ok()) else {
            return ChatTemplate::Builtin("chatml".into());
        };
        let bos = special_text(model, model.vocab().bos());
        let eos = special_text(model, model.vocab().eos());
        match Self::jinja(&source, bos, eos) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "the model's Jinja chat template cannot be rendered; using llama.cpp's built-in approximation");
                ChatTemplate::Builtin(source)
            }
        }
    }

    /// Compiles `source` and checks it on a trial conversation.
    pub fn jinja(source: &str, bos: String, eos: String) -> Result<Self, EngineError> {
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| EngineError::Template(e.to_string()))?;
        let trial =
            [ChatMessage::system("s"), ChatMessage::user("u"), ChatMessage::assistant("a"), ChatMessage::user("v")];
        let rendered = render_jinja(&env, &bos, &eos, &trial)?;
        let mut at = 0;
        for i in 0..trial.len() {
            at += rendered[at..].find(&placeholder(i)).ok_or_else(|| {
                EngineError::Template(format!("the template dropped or reordered message {i} of a trial conversation"))
            })?;
        }
        Ok(ChatTemplate::Jinja { env, bos, eos })
    }

    /// The prompt text with placeholders for the messages' content, the
    /// assistant's turn opened.
    pub fn render(&self, model: &LlamaModel, messages: &[ChatMessage]) -> Result<String, EngineError> {
        match self {
            ChatTemplate::Jinja { env, bos, eos } => render_jinja(env, bos, eos, messages),
            ChatTemplate::Builtin(name) => {
                let tmpl = LlamaChatTemplate::new(name).map_err(|e| EngineError::Template(e.to_string()))?;
                let stand_ins = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| LlamaChatMessage::new(m.role.as_str().to_string(), placeholder(i)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| EngineError::Template(e.to_string()))?;
                model.apply_chat_template(&tmpl, &stand_ins, true).map_err(|e| EngineError::Template(e.to_string()))
            }
        }
    }

    /// The prompt text with placeholders, for a Jinja template (no model at
    /// hand: a tokenizer served by a remote).
    pub fn render_jinja_only(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        match self {
            ChatTemplate::Jinja { env, bos, eos } => render_jinja(env, bos, eos, messages),
            ChatTemplate::Builtin(_) => {
                Err(EngineError::Template("only a Jinja template renders without the model".into()))
            }
        }
    }

    /// Which kind is in use, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ChatTemplate::Jinja { .. } => "the model's own Jinja template",
            ChatTemplate::Builtin(_) => "llama.cpp's built-in template",
        }
    }
}

/// A rendered prompt cut into its pieces, in order: template text (`true`:
/// its special tokens are parsed) and message content (`false`: never).
pub fn split_rendered<'a>(rendered: &'a str, messages: &'a [ChatMessage]) -> Result<Vec<(&'a str, bool)>, EngineError> {
    let mut out = Vec::with_capacity(messages.len() * 2 + 1);
    let mut rest = rendered;
    for (i, message) in messages.iter().enumerate() {
        let marker = placeholder(i);
        let at = rest.find(&marker).ok_or_else(|| {
            EngineError::Template(format!("chat template dropped message {i} ({})", message.role.as_str()))
        })?;
        out.push((&rest[..at], true));
        out.push((message.content.as_str(), false));
        rest = &rest[at + marker.len()..];
    }
    out.push((rest, true));
    Ok(out)
}

/// Applies the chat template (with the assistant turn opened) and tokenizes the
/// result: template text with special parsing, message content without.
pub fn tokenize_chat(
    model: &LlamaModel,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Vec<LlamaToken>, EngineError> {
    if messages.is_empty() {
        return Err(EngineError::InvalidParam {
            field: "messages",
            rule: "must contain at least one message",
            value: "[]".into(),
        });
    }
    let rendered = template.render(model, messages)?;
    let vocab = model.vocab();
    let mut tokens = Vec::with_capacity(rendered.len() / 3);
    for (i, (text, special)) in split_rendered(&rendered, messages)?.into_iter().enumerate() {
        // Only the prompt's start may get the vocabulary's BOS.
        tokens.extend(vocab.tokenize(text.as_bytes(), i == 0, special));
    }
    Ok(tokens)
}

/// Renders a Jinja chat template with placeholders for the messages' content.
fn render_jinja(
    env: &minijinja::Environment<'static>,
    bos: &str,
    eos: &str,
    messages: &[ChatMessage],
) -> Result<String, EngineError> {
    let msgs: Vec<JinjaMessage> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| JinjaMessage { role: m.role.as_str(), content: placeholder(i) })
        .collect();
    let tmpl = env.get_template("chat").map_err(|e| EngineError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => msgs,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(|e| EngineError::Template(e.to_string()))
}

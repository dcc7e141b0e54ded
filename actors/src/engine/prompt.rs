//! Chat prompt → tokens, with the model's own chat template. Message content
//! is tokenized without special-token parsing, so a user who types
//! `<|im_start|>` gets those characters, not a new turn; only the markers the
//! template itself writes are special.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::error::EngineError;
use crate::params::ChatMessage;

/// A private-use marker that stands in for message `i` while the template is
/// applied; it cannot come from a tokenizer's special tokens.
fn placeholder(i: usize) -> String {
    format!("\u{E000}{i}\u{E001}")
}

/// Applies the chat template (with the assistant turn opened) and tokenizes the
/// result: template text with special parsing, message content without.
pub fn tokenize_chat(
    model: &LlamaModel,
    template: &str,
    messages: &[ChatMessage],
) -> Result<Vec<LlamaToken>, EngineError> {
    if messages.is_empty() {
        return Err(EngineError::InvalidParam {
            field: "messages",
            rule: "must contain at least one message",
            value: "[]".into(),
        });
    }
    let tmpl = LlamaChatTemplate::new(template).map_err(|e| EngineError::Template(e.to_string()))?;
    let stand_ins = messages
        .iter()
        .enumerate()
        .map(|(i, m)| LlamaChatMessage::new(m.role.as_str().to_string(), placeholder(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let rendered =
        model.apply_chat_template(&tmpl, &stand_ins, true).map_err(|e| EngineError::Template(e.to_string()))?;

    let vocab = model.vocab();
    let mut tokens = Vec::with_capacity(rendered.len() / 3);
    let mut rest = rendered.as_str();
    let mut first = true;
    for (i, message) in messages.iter().enumerate() {
        let marker = placeholder(i);
        let at = rest.find(&marker).ok_or_else(|| {
            EngineError::Template(format!("chat template dropped message {i} ({})", message.role.as_str()))
        })?;
        tokens.extend(vocab.tokenize(&rest.as_bytes()[..at], first, true));
        tokens.extend(vocab.tokenize(message.content.as_bytes(), false, false));
        first = false;
        rest = &rest[at + marker.len()..];
    }
    tokens.extend(vocab.tokenize(rest.as_bytes(), false, true));
    Ok(tokens)
}

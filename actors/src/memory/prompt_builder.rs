//! Builds the prompt for one chat turn: the fixed system prompt, the most
//! recent turns, a delimited block of recalled earlier messages in the *user*
//! role (they are text users wrote: they never gain system authority), then
//! the new message, all within the context budget as counted by the model's
//! own tokenizer. When something must go, the oldest recent turn goes first,
//! then the weakest recalled message; the new message and the newest turns stay.

use serde::Serialize;

use crate::engine::sampling::check_fits;
use crate::error::EngineError;
use crate::params::{ChatMessage, Role};

/// Longest excerpt of one recalled message put in the prompt, in characters.
const RECALL_EXCERPT_CHARS: usize = 600;

/// An earlier message found by meaning.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Recalled {
    pub id: u64,
    pub role: Role,
    pub content: String,
    pub score: f32,
}

/// Token limits of one generation.
#[derive(Clone, Copy, Debug)]
pub struct PromptBudget {
    pub n_ctx: u32,
    pub max_tokens: u32,
}

/// The prompt as the model will see it.
#[derive(Clone, Debug)]
pub struct BuiltPrompt {
    pub messages: Vec<ChatMessage>,
    /// The prompt's token ids (the chat template applied): the request is
    /// started with them, not tokenized again.
    pub prompt: Vec<i32>,
    /// Ids of the recalled messages that made it into the prompt.
    pub recalled: Vec<u64>,
    /// How many recent turns made it into the prompt.
    pub recent_kept: usize,
}

fn excerpt(text: &str) -> String {
    match text.char_indices().nth(RECALL_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Opens the block of recalled messages.
pub const RECALL_HEADER: &str = "[Earlier messages that may be relevant, quoted from memory]";
/// Closes it.
pub const RECALL_FOOTER: &str = "[End of earlier messages]";

/// The recalled messages as one user-role message, or none.
fn recall_message(recalled: &[Recalled]) -> Option<ChatMessage> {
    if recalled.is_empty() {
        return None;
    }
    let mut text = String::from(RECALL_HEADER);
    for r in recalled {
        text.push_str(&format!("\n- {}: {}", r.role.as_str(), excerpt(&r.content)));
    }
    text.push('\n');
    text.push_str(RECALL_FOOTER);
    Some(ChatMessage::user(text))
}

/// Assembles the prompt; `tokenize` gives the token ids of a message list
/// with the chat template applied.
pub fn build_prompt(
    system_prompt: &str,
    mut recalled: Vec<Recalled>,
    recent: &[ChatMessage],
    user_text: &str,
    budget: PromptBudget,
    tokenize: &dyn Fn(&[ChatMessage]) -> Result<Vec<i32>, EngineError>,
) -> Result<BuiltPrompt, EngineError> {
    recalled.sort_by(|a, b| b.score.total_cmp(&a.score));
    let assemble = |first_recent: usize, recalled: &[Recalled]| -> Result<(Vec<ChatMessage>, Vec<i32>), EngineError> {
        let system = system_prompt.trim();
        let mut messages: Vec<ChatMessage> =
            (!system.is_empty()).then(|| ChatMessage::system(system)).into_iter().collect();
        messages.extend_from_slice(&recent[first_recent..]);
        messages.extend(recall_message(recalled));
        messages.push(ChatMessage::user(user_text));
        let tokens = tokenize(&messages)?;
        crate::params::tokenized(tokens.len());
        Ok((messages, tokens))
    };
    let fits = |tokens: &[i32]| check_fits(tokens.len() as u32, Some(budget.max_tokens), budget.n_ctx).is_ok();
    let done = |messages, tokens, recalled: &[Recalled], first_recent| BuiltPrompt {
        messages,
        prompt: tokens,
        recalled: recalled.iter().map(|r| r.id).collect(),
        recent_kept: recent.len() - first_recent,
    };

    // Usually everything fits: one count (one tokenization of the prompt).
    let (messages, tokens) = assemble(0, &recalled)?;
    if fits(&tokens) {
        return Ok(done(messages, tokens, &recalled, 0));
    }
    // Else keep as many of the newest turns as fit: the token count only falls
    // as older turns go, so a binary search over the cut finds it in log(n) counts.
    let (mut lo, mut hi) = (1, recent.len());
    let mut best = None;
    while lo <= hi {
        let mid = (lo + hi) / 2;
        let (messages, tokens) = assemble(mid, &recalled)?;
        if fits(&tokens) {
            best = Some((mid, messages, tokens));
            hi = mid - 1;
        } else {
            lo = mid + 1;
        }
    }
    if let Some((first_recent, messages, tokens)) = best {
        return Ok(done(messages, tokens, &recalled, first_recent));
    }
    // No recent turn fits: drop recalled messages, weakest first.
    loop {
        let (messages, tokens) = assemble(recent.len(), &recalled)?;
        if fits(&tokens) || recalled.is_empty() {
            check_fits(tokens.len() as u32, Some(budget.max_tokens), budget.n_ctx)?;
            return Ok(done(messages, tokens, &recalled, recent.len()));
        }
        recalled.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per whitespace-separated word plus 3 per message.
    fn words(messages: &[ChatMessage]) -> Result<Vec<i32>, EngineError> {
        Ok(vec![0; messages.iter().map(|m| m.content.split_whitespace().count() + 3).sum()])
    }

    fn recall(id: u64, text: &str, score: f32) -> Recalled {
        Recalled { id, role: Role::User, content: text.into(), score }
    }

    #[test]
    fn everything_fits_in_order() {
        let recent = vec![ChatMessage::user("a b"), ChatMessage::assistant("c d")];
        let p = build_prompt(
            "sys",
            vec![recall(1, "fact", 0.9)],
            &recent,
            "question",
            PromptBudget { n_ctx: 100, max_tokens: 10 },
            &words,
        )
        .unwrap();
        assert_eq!(p.messages.len(), 5);
        assert_eq!(p.messages[0], ChatMessage::system("sys"), "the system prompt is fixed");
        assert_eq!(p.messages[3].role, Role::User, "recalled text never takes the system role");
        assert!(p.messages[3].content.contains("user: fact"));
        assert_eq!(p.messages[4].content, "question");
        assert_eq!((p.recalled, p.recent_kept), (vec![1], 2));
    }

    #[test]
    fn oldest_turns_go_first_then_weakest_recall() {
        let recent: Vec<ChatMessage> = (0..10).map(|i| ChatMessage::user(format!("turn {i} w w w w"))).collect();
        // sys 4 + recall block 22 + q 4 = 30 words; 20 left for turns of 9 words each.
        let budget = PromptBudget { n_ctx: 60, max_tokens: 10 };
        let p =
            build_prompt("sys", vec![recall(1, "x", 0.9), recall(2, "y", 0.2)], &recent, "q", budget, &words).unwrap();
        assert!(p.prompt.len() + 10 <= 60);
        assert_eq!(p.recent_kept, 2);
        assert_eq!(p.messages.last().unwrap().content, "q");
        let kept: Vec<&str> = p.messages[1..p.messages.len() - 2].iter().map(|m| m.content.as_str()).collect();
        assert!(
            kept.iter().all(|k| k.starts_with("turn 9") || k.starts_with("turn 8") || k.starts_with("turn 7")),
            "{kept:?}"
        );
        assert_eq!(p.recalled, vec![1, 2]);

        // Room for sys, q and a block of one recall (19 words), not for two (22).
        let tight = PromptBudget { n_ctx: 37, max_tokens: 10 };
        let p =
            build_prompt("sys", vec![recall(1, "x", 0.9), recall(2, "y", 0.2)], &recent, "q", tight, &words).unwrap();
        assert_eq!(p.recent_kept, 0);
        assert_eq!(p.recalled, vec![1], "the weaker recall is dropped first");
    }

    #[test]
    fn a_message_too_long_alone_is_an_error_naming_both_numbers() {
        let long = "w ".repeat(200);
        let err = build_prompt("", vec![], &[], &long, PromptBudget { n_ctx: 64, max_tokens: 16 }, &words).unwrap_err();
        assert!(matches!(err, EngineError::PromptTooLong { n_ctx: 64, max_tokens: 16, .. }), "{err}");
    }
}

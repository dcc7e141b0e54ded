//! Console chat on the chat layer: conversations are stored and remembered.

use std::io::Write;

use modelpool_actors::{ChatEvent, ChatHandle, ConversationId, Role, SendMessage};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::config::Config;
use crate::startup::start_chat;

const HELP: &str = "Commands: /new (new conversation), /history, /recall <text>, /pool, /help, /quit";

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let chat = start_chat(&cfg).await?;
    println!("modelpool console. {HELP}");
    let mut conversation: Option<ConversationId> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next_line().await? else { break };
        let line = line.trim();
        let result = match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" => {
                println!("{HELP}");
                Ok(())
            }
            "/pool" => chat.pool().status().await.map(|s| println!("{s}")).map_err(Into::into),
            "/new" => {
                conversation = None;
                println!("(a new conversation starts with your next message)");
                Ok(())
            }
            "/history" => history(&chat, conversation),
            _ if line.starts_with("/recall") => recall(&chat, conversation, line["/recall".len()..].trim()).await,
            _ if line.starts_with('/') => {
                println!("unknown command {line:?}. {HELP}");
                Ok(())
            }
            text => turn(&chat, &mut conversation, text).await,
        };
        if let Err(e) = result {
            println!("error: {e}");
        }
    }
    chat.pool().shutdown().await;
    chat.shutdown().await?;
    Ok(())
}

async fn turn(chat: &ChatHandle, conversation: &mut Option<ConversationId>, text: &str) -> anyhow::Result<()> {
    let msg = SendMessage { conversation_id: *conversation, namespace: None, text: text.to_string(), sampling: None };
    let mut stream = chat.send(msg).await?;
    *conversation = Some(stream.conversation_id);
    while let Some(event) = stream.next_event().await {
        match event {
            ChatEvent::Token(t) => {
                print!("{t}");
                std::io::stdout().flush()?;
            }
            ChatEvent::Done(reply) => {
                println!();
                tracing::debug!(usage = ?reply.usage, recalled = reply.recalled.len(), "turn finished");
                return Ok(());
            }
            ChatEvent::Error(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn history(chat: &ChatHandle, conversation: Option<ConversationId>) -> anyhow::Result<()> {
    let Some(id) = conversation else {
        println!("(no conversation yet)");
        return Ok(());
    };
    println!("Conversation {id}:");
    for m in chat.history(&id, None, usize::MAX)? {
        let who = match m.role {
            Role::User => "you",
            Role::Assistant => "assistant",
            Role::System => "system",
        };
        println!("  [{}] {who}: {}", m.id, m.content);
    }
    Ok(())
}

async fn recall(chat: &ChatHandle, conversation: Option<ConversationId>, text: &str) -> anyhow::Result<()> {
    let Some(id) = conversation else {
        println!("(no conversation yet)");
        return Ok(());
    };
    if text.is_empty() {
        println!("usage: /recall <text>");
        return Ok(());
    }
    let hits = chat.recall(&id, text).await?;
    if hits.is_empty() {
        println!("(nothing outside the recent window scores above {})", chat.options().recall_min_score);
    }
    for r in hits {
        println!("  {:.3}  [{}] {}: {}", r.score, r.id, r.role.as_str(), r.content);
    }
    Ok(())
}

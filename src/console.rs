//! Console chat on the chat layer: conversations are stored and remembered.
//! Lines are read with a line editor (rustyline: arrow keys, editing, a
//! history kept across sessions in the data directory). Ctrl-C cancels the
//! reply being streamed (or clears the line being typed); Ctrl-D leaves.

use std::io::Write;
use std::path::PathBuf;

use modelpool_actors::{ChatEvent, ChatHandle, ConversationId, Role, SendMessage};
use rustyline::error::ReadlineError;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::startup::start_chat;

const HELP: &str =
    "Commands: /new (new conversation), /history, /recall <text>, /pool, /help, /quit. Ctrl-C stops a reply, Ctrl-D leaves.";

/// What the line editor's thread read.
enum Input {
    Line(String),
    /// Ctrl-C while typing: the line is dropped.
    Interrupted,
    /// Ctrl-D or the end of input.
    End,
}

/// Runs the line editor on a thread of its own (it blocks on the terminal):
/// it reads one line, hands it over, and waits until that line is handled
/// before it shows the next prompt.
fn spawn_editor(history: PathBuf) -> (mpsc::Receiver<Input>, std::sync::mpsc::Sender<()>) {
    let (lines_tx, lines_rx) = mpsc::channel(1);
    let (next_tx, next_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut editor = match rustyline::DefaultEditor::new() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("error: no line editor: {e}");
                let _ = lines_tx.blocking_send(Input::End);
                return;
            }
        };
        let _ = editor.load_history(&history);
        loop {
            let input = match editor.readline("> ") {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                        if let Err(e) = editor.save_history(&history) {
                            tracing::warn!(path = %history.display(), error = %e, "could not save the console history");
                        }
                    }
                    Input::Line(line)
                }
                Err(ReadlineError::Interrupted) => Input::Interrupted,
                Err(ReadlineError::Eof) => Input::End,
                Err(e) => {
                    eprintln!("error: reading the terminal: {e}");
                    Input::End
                }
            };
            let end = matches!(input, Input::End);
            if lines_tx.blocking_send(input).is_err() || end || next_rx.recv().is_err() {
                return;
            }
        }
    });
    (lines_rx, next_tx)
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let chat = start_chat(&cfg).await?;
    println!("modelpool console. {HELP}");
    let mut conversation: Option<ConversationId> = None;
    let (mut lines, next) = spawn_editor(cfg.data_dir.join("console_history.txt"));
    while let Some(input) = lines.recv().await {
        let line = match input {
            Input::Line(l) => l,
            Input::Interrupted => {
                let _ = next.send(());
                continue;
            }
            Input::End => break,
        };
        let line = line.trim();
        let result = match line {
            "" => Ok(()),
            "/quit" | "/exit" => break,
            "/help" => {
                println!("{HELP}");
                Ok(())
            }
            "/pool" => chat
                .pool()
                .status()
                .await
                .map(|s| {
                    println!("{s}");
                    if let Some(line) = threads_line(&chat) {
                        println!("{line}");
                    }
                })
                .map_err(Into::into),
            "/new" => {
                conversation = None;
                println!("(a new conversation starts with your next message)");
                Ok(())
            }
            "/history" => history(&chat, conversation).await,
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
        let _ = next.send(());
    }
    chat.pool().shutdown().await;
    chat.shutdown().await?;
    Ok(())
}

async fn turn(chat: &ChatHandle, conversation: &mut Option<ConversationId>, text: &str) -> anyhow::Result<()> {
    let msg = SendMessage {
        conversation_id: *conversation,
        namespace: None,
        text: text.to_string(),
        sampling: None,
        client: None,
    };
    let mut stream = chat.send(msg).await?;
    *conversation = Some(stream.conversation_id);
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event,
            // The terminal is not in the editor's raw mode while a reply
            // streams, so Ctrl-C arrives as SIGINT: dropping the stream
            // cancels the generation at the instance's next step.
            _ = tokio::signal::ctrl_c() => {
                println!(" ^C (reply stopped)");
                return Ok(());
            }
        };
        let Some(event) = event else { break };
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

async fn history(chat: &ChatHandle, conversation: Option<ConversationId>) -> anyhow::Result<()> {
    let Some(id) = conversation else {
        println!("(no conversation yet)");
        return Ok(());
    };
    println!("Conversation {id}:");
    for m in chat.history(&id, None, usize::MAX).await? {
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

/// A line for `/pool` while instances decode with fewer threads than set
/// (other processes keep cores busy); nothing otherwise.
fn threads_line(chat: &ChatHandle) -> Option<String> {
    let cpu = chat.pool().engine().cpu_status()?;
    let lowered: Vec<String> = cpu
        .instances
        .iter()
        .filter(|t| t.current < t.configured)
        .map(|t| format!("instance {}: {} of {} threads", t.instance, t.current, t.configured))
        .collect();
    (!lowered.is_empty()).then(|| {
        format!("Other processes keep {:.1} of {} cores busy; {}", cpu.others_busy, cpu.cores, lowered.join(", "))
    })
}

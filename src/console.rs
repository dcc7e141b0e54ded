//! Console chat: type a message, read the streamed answer.

use std::io::Write;

use futures::StreamExt;
use modelpool_actors::{ChatMessage, GenEvent, GenerateRequest, PoolHandle};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::config::Config;
use crate::startup::start_pool;

const HELP: &str = "Commands: /pool (pool status), /new (forget this conversation), /help, /quit";

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let pool = start_pool(&cfg).await?;
    println!("modelpool console. {HELP}");
    let mut history: Vec<ChatMessage> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next_line().await? else { break };
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" => println!("{HELP}"),
            "/pool" => println!("{}", pool.status().await?),
            "/new" => {
                history.clear();
                println!("(new conversation)");
            }
            text => {
                history.push(ChatMessage::user(text));
                match answer(&pool, &cfg, &history).await {
                    Ok(reply) => history.push(ChatMessage::assistant(reply)),
                    Err(e) => {
                        history.pop();
                        println!("error: {e}");
                    }
                }
            }
        }
    }
    pool.shutdown().await;
    Ok(())
}

async fn answer(pool: &PoolHandle, cfg: &Config, history: &[ChatMessage]) -> anyhow::Result<String> {
    let mut messages = Vec::with_capacity(history.len() + 1);
    if !cfg.system_prompt.is_empty() {
        messages.push(ChatMessage::system(cfg.system_prompt.clone()));
    }
    messages.extend_from_slice(history);
    let mut stream = pool.generate(GenerateRequest { messages, sampling: cfg.sampling.clone() }).await?;
    let mut reply = String::new();
    while let Some(event) = stream.next().await {
        match event {
            GenEvent::Token(t) => {
                print!("{t}");
                std::io::stdout().flush()?;
                reply.push_str(&t);
            }
            GenEvent::Done(done) => {
                println!();
                tracing::debug!(?done, "reply finished");
                return Ok(reply);
            }
            GenEvent::Error(e) => return Err(e.into()),
        }
    }
    Ok(reply)
}

//! A larger actix system that embeds modelpool: its own actor and route sit
//! beside modelpool's pool and chat actors, and modelpool's HTTP API is
//! mounted under /llm on the same `App`.
//!
//!   scripts/example.sh embedded [MODEL.gguf] [EMBEDDER.gguf]
//!
//! Without arguments it uses the models that scripts/setup.sh prepares.
//! With EMBEDDED_ONESHOT=1 it runs one chat turn through the actors and exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpResponse, HttpServer};
use modelpool_actors::http::{self, ApiSettings, ApiState};
use modelpool_actors::{
    ChatHandle, ChatOptions, Durability, EmbedderHandle, InstanceOptions, LlamaEngine, LoadEvent, PoolHandle,
    PoolOptions,
};

/// The host system's own actor: counts visitors.
struct Visitors(u64);

impl Actor for Visitors {
    type Context = Context<Self>;
}

/// Records a visit; answers the running count.
#[derive(Message)]
#[rtype(result = "u64")]
struct Visit;

impl Handler<Visit> for Visitors {
    type Result = u64;

    fn handle(&mut self, _: Visit, _: &mut Self::Context) -> u64 {
        self.0 += 1;
        self.0
    }
}

async fn hello(visitors: web::Data<Addr<Visitors>>) -> HttpResponse {
    let n = visitors.send(Visit).await.unwrap_or(0);
    HttpResponse::Ok().body(format!("host system here; visitor {n}. The model lives under /llm.\n"))
}

fn model_dir() -> PathBuf {
    std::env::var_os("MODELPOOL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/modelpool/models"))
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().map(PathBuf::from).unwrap_or_else(|| model_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let embed = args.next().map(PathBuf::from).unwrap_or_else(|| model_dir().join("all-MiniLM-L6-v2.Q8_0.gguf"));

    // modelpool's actors: the pool (weights loaded once), the embedder, the chat layer.
    let engine = LlamaEngine::load(&model)?;
    let opts = PoolOptions {
        instances: 1,
        max_queue: 16,
        acquire_timeout: Duration::from_secs(30),
        max_generation: Duration::from_secs(120),
        health_interval: Duration::from_secs(30),
        instance: InstanceOptions { slots: 4, ..InstanceOptions::single(2048, 2) },
        remotes: Vec::new(),
        // One application, one client: no per-client share.
        max_per_client: 0,
    };
    let pool = PoolHandle::start(engine, opts, Arc::new(|e: LoadEvent| eprintln!("{e:?}"))).await?;
    let embedder = EmbedderHandle::start(&embed, 1).await?;
    let data = std::env::temp_dir().join("modelpool-embedded-example");
    let chat = ChatHandle::start(pool.clone(), embedder, &data, Durability::Sync, ChatOptions::default()).await?;

    // The host talks to the chat actor directly, too.
    let reply = chat.say(None, "Say hello to the host system in five words.").await?;
    println!("chat turn through the actors: {:?} ({} tokens)", reply.reply, reply.usage.completion_tokens);
    if std::env::var_os("EMBEDDED_ONESHOT").is_some() {
        pool.shutdown().await;
        chat.shutdown().await?;
        return Ok(());
    }

    let visitors = Visitors(0).start();
    let state = ApiState::new(chat.clone(), ApiSettings::default());
    println!("host system on http://127.0.0.1:8081 (try /hello, /llm/pool, /llm/v1/chat/completions)");
    HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(visitors.clone()))
            .route("/hello", web::get().to(hello))
            .service(web::scope("/llm").configure(http::configure(state.clone())))
            .default_service(http::default_service())
    })
    .bind(("127.0.0.1", 8081))?
    .run()
    .await?;
    chat.shutdown().await?;
    Ok(())
}

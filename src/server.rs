//! `modelpool serve`: the HTTP API in front of the pool and the chat layer.
//! It listens at once (health checks answer 503 "loading" while the model
//! loads) and drains gracefully on SIGTERM/SIGINT.

use std::time::Duration;

use actix_web::{App, HttpServer};
use modelpool_actors::http::{self, ApiSettings, ApiState};

use crate::config::Config;
use crate::startup::start_chat;

/// CORS for `server.cors_origins` (validated at load): an allowed origin
/// gets the headers, any method and request header, and may read the
/// routing headers; another origin gets none (its browser then keeps the
/// answer from the page), and the request itself is served as usual.
fn cors(origins: &[String]) -> actix_cors::Cors {
    let cors = actix_cors::Cors::default()
        .allow_any_method()
        .allow_any_header()
        .expose_headers(["x-conversation-id", "x-modelpool-node", "retry-after"])
        .max_age(600);
    if origins.iter().any(|o| o == "*") {
        return cors.allow_any_origin();
    }
    origins.iter().fold(cors, |cors, origin| cors.allowed_origin(origin))
}

pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let settings = ApiSettings {
        api_keys: cfg.server.api_keys.clone(),
        key_namespaces: cfg.key_namespaces(),
        metrics_require_key: cfg.server.metrics_require_key,
        max_body_bytes: cfg.server.max_body_bytes,
        node: cfg.node_name(),
        allowed_hosts: cfg.allowed_hosts(),
    };
    let state = ApiState::loading(settings);
    let drain = Duration::from_millis(cfg.server.drain_timeout_ms);
    let app_state = state.clone();
    let origins = cfg.server.cors_origins.clone();
    let sockets = http::disconnect::SocketOptions {
        write_timeout: Duration::from_millis(cfg.server.write_timeout_ms),
        send_buffer_bytes: cfg.server.send_buffer_bytes,
    };
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::Condition::new(!origins.is_empty(), cors(&origins)))
            .wrap(actix_web::middleware::Logger::new("%r %s %Dms").log_target("modelpool::http"))
            .configure(http::configure(app_state.clone()))
            .default_service(http::default_service())
    })
    // Each connection's socket, so that a non-streaming request notices a client that hung up.
    // and a send timeout, so that a client that reads nothing is let go.
    .on_connect(move |conn, ext| http::disconnect::record_peer(conn, ext, sockets))
    .disable_signals()
    .shutdown_timeout(drain.as_secs().max(1))
    .bind(&cfg.server.bind)
    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.server.bind))?;
    for addr in server.addrs() {
        eprintln!("modelpool listening on http://{addr} (ready once the model is loaded)");
    }
    let server = server.run();
    let handle = server.handle();
    let mut server = std::pin::pin!(server);

    let chat = tokio::select! {
        loaded = start_chat(&cfg) => match loaded {
            Ok(chat) => chat,
            Err(e) => {
                // The stop completes only while the server future runs: drive it to the end.
                let stopping = handle.stop(false);
                let _ = futures::join!(stopping, &mut server);
                return Err(e);
            }
        },
        ended = &mut server => {
            ended?;
            anyhow::bail!("the HTTP server stopped while the model was loading");
        }
    };
    state.attach(chat.clone());
    eprintln!("modelpool ready");

    let pool = chat.pool().clone();
    let draining = state.clone();
    actix::spawn(async move {
        wait_for_signal().await;
        eprintln!("Shutting down: no new requests; draining in-flight ones (up to {} ms)…", drain.as_millis());
        draining.start_draining();
        pool.stop_accepting().await;
        if !pool.drain(drain).await {
            eprintln!("Drain timeout reached with requests still running");
        }
        handle.stop(true).await;
    });

    server.await?;
    chat.pool().shutdown().await;
    chat.shutdown().await?;
    eprintln!("Stopped; conversations flushed to {}", cfg.data_dir.display());
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

//! modelpool: keeps a GGUF model loaded once and serves many users from a
//! pool of warm llama.cpp instances.

mod config;
mod console;
mod server;
mod startup;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "modelpool", version, about = "Serve a GGUF model to many users from a pool of warm instances")]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GlobalArgs {
    /// TOML file layered over the defaults and the profile.
    #[arg(long, global = true, env = "MODELPOOL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Deployment profile: development, small, medium or large.
    #[arg(long, global = true, env = "MODELPOOL_PROFILE", value_name = "NAME")]
    profile: Option<String>,
    /// GGUF chat model.
    #[arg(long, global = true, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Number of model instances.
    #[arg(long, global = true, value_name = "N")]
    instances: Option<usize>,
    /// Sequences each instance decodes together (continuous batching).
    #[arg(long, global = true, value_name = "N")]
    slots: Option<u32>,
    /// CPU threads per instance (0: cores / instances).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<u32>,
    /// Tokens one sequence may hold (prompt + reply); each instance's KV
    /// cache holds slots × n_ctx.
    #[arg(long, global = true, value_name = "N")]
    n_ctx: Option<u32>,
    /// Directory for conversations and their vectors.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Load the model for every request instead of pooling (comparison mode).
    #[arg(long, global = true)]
    per_request: bool,
    /// A remote llama-server (URL) to add to the pool; repeatable. With
    /// `--instances 0` the pool has no local model instance.
    #[arg(long = "remote", global = true, value_name = "URL")]
    remotes: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve {
        /// Listen address, ADDR:PORT.
        #[arg(long, value_name = "ADDR:PORT")]
        bind: Option<String>,
    },
    /// Chat in the terminal (commands: /new, /history, /recall <text>, /pool, /help, /quit).
    Chat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MODELPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,modelpool=info,llama-cpp-2=error")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let g = cli.global;
    let bind = match &cli.command {
        Command::Serve { bind } => bind.clone(),
        Command::Chat => None,
    };
    let overrides = Overrides {
        config: g.config,
        profile: g.profile,
        model: g.model,
        instances: g.instances,
        slots: g.slots,
        threads: g.threads,
        n_ctx: g.n_ctx,
        data_dir: g.data_dir,
        bind,
        per_request: g.per_request,
        remotes: g.remotes,
    };
    let cfg = match Config::load(&overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = actix::System::new().block_on(async move {
        match cli.command {
            Command::Serve { .. } => server::serve(cfg).await,
            Command::Chat => console::run(cfg).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

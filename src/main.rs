//! `shardline`: run Llama-family models across many machines.

mod coordinator;
mod generate;
mod logging;
mod node;

use clap::{Parser, Subcommand};

/// Run Llama-family models across many machines: each node serves a range of layers on its GPU (or CPU),
/// activations stream stage to stage over QUIC, nodes are found through a Kademlia DHT.
#[derive(Debug, Parser)]
#[command(name = "shardline", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text with a whole model in this process (the single-process engine).
    Generate(generate::GenerateArgs),
    /// Serve a layer range of a model: QUIC stage server + DHT announcement.
    Node(node::NodeCmd),
    /// Discover nodes through the DHT, register them, plan routes.
    Coordinator(coordinator::CoordinatorCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Node(cmd) => node::run(cmd),
        Command::Coordinator(cmd) => coordinator::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

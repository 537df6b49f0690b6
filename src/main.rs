//! `shardline`: run Llama-family models across many machines.

mod args;
mod config;
mod coordinator;
mod demo;
mod fetch;
mod generate;
mod logging;
mod node;
mod nodes;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

/// Run Llama-family models across many machines: each node serves a range of layers on its GPU (or CPU),
/// activations stream stage to stage over QUIC, nodes are found through a Kademlia DHT.
#[derive(Debug, Parser)]
#[command(
    name = "shardline",
    version,
    propagate_version = true,
    after_help = "Examples:
  shardline demo                                  a coordinator and 3 nodes on this machine, API on :8080
  shardline demo --prompt \"Hello!\"                one answer through that swarm, then exit
  shardline fetch                                 download the default model into the cache
  shardline generate --chat --prompt \"Hello!\"     the whole model in this process
  shardline coordinator --http 0.0.0.0:8080 --p2p-listen /ip4/0.0.0.0/tcp/4000
  shardline node --layers 0..15 --bootstrap /ip4/10.0.0.1/tcp/4000
  shardline nodes --http http://127.0.0.1:8080    the nodes and layer coverage the dashboard shows
  shardline --config shardline.toml node          flags from a file (see docs/shardline.example.toml)
  shardline completions bash > /etc/bash_completion.d/shardline

Swarm addresses are libp2p multiaddrs: /ip4/10.0.0.1/tcp/4000 (or /ip4/10.0.0.1/udp/4000/quic-v1), as printed on
the `p2p listening on` line of a coordinator or node.
--model takes a GGUF file or a Hugging Face model directory (config.json, tokenizer.json, *.safetensors)."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    pub log_format: logging::LogFormat,
    /// Read flags from a TOML file (see docs/shardline.example.toml); flags on the command line win.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a coordinator and K nodes on this machine and serve the API (fetches the model first if needed).
    Demo(demo::DemoArgs),
    /// Generate text with a whole model in this process (the single-process engine).
    Generate(generate::GenerateArgs),
    /// Serve a layer range of a model: QUIC stage server + DHT announcement.
    Node(node::NodeCmd),
    /// Discover nodes through the DHT, register them, plan routes; `--http` serves the OpenAI-compatible API.
    Coordinator(coordinator::CoordinatorCmd),
    /// Download the default model (SmolLM2-135M-Instruct) into the model cache and print its path.
    Fetch(fetch::FetchArgs),
    /// Print the registered nodes and the layer coverage of each model (what the dashboard shows).
    Nodes(nodes::NodesCmd),
    /// Print a shell completion script, e.g.
    /// `shardline completions bash > ~/.local/share/bash-completion/completions/shardline`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

fn main() -> std::process::ExitCode {
    let args = match config::apply(&Cli::command(), std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Demo(args) => demo::run(args, cli.log_format),
        Command::Generate(args) => generate::run(args),
        Command::Node(cmd) => node::run(cmd),
        Command::Coordinator(cmd) => coordinator::run(cmd),
        Command::Fetch(args) => fetch::run(args),
        Command::Nodes(cmd) => nodes::run(cmd),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "shardline", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

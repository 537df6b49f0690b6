//! Operator logs on stderr: human text by default, JSON lines with `--log-format json`; `RUST_LOG` filters.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// libp2p lines that say nothing to an operator, off unless `RUST_LOG` names libp2p: kad's "Failed to trigger
/// bootstrap: No known peers." (logged by every first peer of a swarm when it starts listening; an unreachable
/// bootstrap peer is reported by shardline itself, with its address and OS error) and the swarm's `local_peer_id`
/// line (shardline prints the peer id).
const QUIET_LIBP2P: [&str; 2] = ["libp2p_kad::behaviour=error", "libp2p_swarm=warn"];

pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("libp2p")) {
        for d in QUIET_LIBP2P {
            if let Ok(d) = d.parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    // Colours only on a terminal: `shardline demo` writes its children's stderr into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

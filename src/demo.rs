//! `shardline demo`: a whole swarm on this machine in one command.
//!
//! Fetches the default model when it is missing, starts a coordinator with the HTTP API and K nodes as separate
//! processes of this executable on loopback (each node a contiguous share of the layers, bootstrapping from the
//! coordinator), waits until the API can route the whole model, then serves until Ctrl-C, or answers one
//! `--prompt` through the API and exits. Child logs go to files; every child is stopped when the demo ends, however
//! it ends, and a child that dies takes the demo down with its last log lines.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shardline_node::default_model::default_model_path;
use shardline_node::model::{LayerRange, ModelFiles};
use tokio::sync::{mpsc, watch};

use crate::fetch::ensure_default_model;
use crate::logging::LogFormat;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Address of the HTTP API (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Number of node processes; the model's layers are shared out between them as evenly as possible.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// GGUF file or Hugging Face model directory (default: SmolLM2-135M-Instruct, fetched into the model cache when
    /// missing).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Answer this prompt through the swarm (chat, greedy), print the answer, stop everything and exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// With `--prompt`: most tokens of the answer.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Compute device of the nodes: `cpu`, `cuda` (alias `gpu`) or `cuda:N` (default: CUDA when a usable GPU is found,
    /// else CPU).
    #[arg(long, value_parser = crate::args::device)]
    pub device: Option<String>,
    /// CPU threads of each node (default: the cores shared out between the nodes).
    #[arg(long)]
    pub threads: Option<usize>,
    /// How long to wait for the nodes to cover every layer, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Directory for the logs of the child processes (default: a new directory in the system's temp directory).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

pub fn run(args: DemoArgs, log_format: LogFormat) -> Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let model = match &args.model {
        Some(p) => {
            crate::args::check_model_path(p)?;
            p.clone()
        }
        None if default_model_path().is_file() => default_model_path(),
        None if std::env::var_os("SHARDLINE_MODEL").is_some_and(|p| !p.is_empty()) => {
            bail!("SHARDLINE_MODEL is set to {}, which is not a file", default_model_path().display())
        }
        None => ensure_default_model(false)?,
    };
    let files = ModelFiles::open(&model).with_context(|| format!("opening {}", model.display()))?;
    let n_layers = files.config().n_layers;
    drop(files);
    if args.nodes > n_layers {
        eprintln!("demo: the model has {n_layers} layers; starting {n_layers} nodes instead of {}", args.nodes);
    }
    let ranges = LayerRange::split_evenly(n_layers, args.nodes);
    let threads = args.threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / ranges.len()).max(1)
    });
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => {
            tempfile::Builder::new().prefix("shardline-demo-").tempdir().context("creating the log directory")?.keep()
        }
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    eprintln!("demo: child logs in {}", log_dir.display());

    let plan = Plan { args: &args, model: &model, n_layers, ranges, threads, log_dir, log_format };
    let mut children = Children::default();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // `block_on` runs the future on this (the main) thread, so the children are spawned from the thread that lives
    // as long as the process: their parent-death signal is tied to the spawning thread.
    let result = rt.block_on(plan.run(&mut children));
    children.stop();
    result
}

struct Plan<'a> {
    args: &'a DemoArgs,
    model: &'a Path,
    n_layers: usize,
    ranges: Vec<LayerRange>,
    threads: usize,
    log_dir: PathBuf,
    /// Passed on to the children, so their log files are in the format asked of the demo.
    log_format: LogFormat,
}

/// The coordinator's addresses, read from its stdout.
struct CoordinatorAddrs {
    p2p: String,
    http: String,
}

impl Plan<'_> {
    async fn run(&self, children: &mut Children) -> Result<()> {
        let (stop_tx, mut stop) = watch::channel(false);
        tokio::spawn(async move {
            match tokio::signal::ctrl_c().await {
                Ok(()) => {
                    let _ = stop_tx.send(true);
                }
                // No Ctrl-C handler: never report a stop (a dropped sender would read as one).
                Err(_) => std::future::pending::<()>().await,
            }
        });

        let exe = std::env::current_exe().context("locating the shardline executable")?;
        let model = self.model.to_string_lossy().into_owned();
        let http = self.args.http.to_string();
        let log_format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let coordinator_args =
            ["coordinator", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--http", http.as_str(), "--model", model.as_str()];
        let stdout = children.spawn(&exe, "coordinator", &coordinator_args, &self.log_dir.join("coordinator.log"))?;
        let addrs = tokio::select! {
            r = coordinator_addrs(stdout, children) => r?,
            _ = stop.changed() => return interrupted(),
        };

        let threads = self.threads.to_string();
        for (i, range) in self.ranges.iter().enumerate() {
            let layers = range.to_string();
            let mut node_args = vec![
                "--log-format",
                log_format,
                "node",
                "--model",
                model.as_str(),
                "--layers",
                layers.as_str(),
                "--listen",
                "127.0.0.1:0",
                "--p2p-listen",
                "/ip4/127.0.0.1/tcp/0",
                "--bootstrap",
                addrs.p2p.as_str(),
                "--threads",
                threads.as_str(),
            ];
            if let Some(d) = &self.args.device {
                node_args.extend(["--device", d.as_str()]);
            }
            let log = self.log_dir.join(format!("node-{i}.log"));
            children.spawn(&exe, &format!("node {layers}"), &node_args, &log)?;
        }

        let client = reqwest::Client::new();
        let base = format!("http://{}", addrs.http);
        let name = tokio::select! {
            r = self.wait_routable(&client, &base, children) => r?,
            _ = stop.changed() => return interrupted(),
        };

        let layout: Vec<String> = self.ranges.iter().map(|r| r.to_string()).collect();
        let ready = format!(
            "ready: {base}  ({name}, {} layers on {} nodes: {})\n  OpenAI API  {base}/v1\n  dashboard   {base}/\n  \
             logs        {}\n  pids        {}\n",
            self.n_layers,
            self.ranges.len(),
            layout.join(", "),
            self.log_dir.display(),
            children.pids()
        );
        if let Some(prompt) = &self.args.prompt {
            eprint!("{ready}");
            return tokio::select! {
                r = chat(&client, &base, &name, prompt, self.args.max_tokens) => r,
                _ = stop.changed() => interrupted(),
                r = watch_children(children) => r,
            };
        }
        let example = format!(
            r#"{{"model": {}, "messages": [{{"role": "user", "content": "Name three uses of a paperclip."}}]}}"#,
            serde_json::Value::from(name.as_str())
        );
        print!(
            "{ready}\nTry it:\n  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{example}'\n\
             Ctrl-C stops the coordinator and every node.\n"
        );
        std::io::stdout().flush()?;
        tokio::select! {
            r = watch_children(children) => r,
            _ = stop.changed() => {
                eprintln!("demo: stopping");
                Ok(())
            }
        }
    }

    /// Polls `/v1/models` until the model is routable; returns its served name.
    async fn wait_routable(&self, client: &reqwest::Client, base: &str, children: &mut Children) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        let mut last_missing = vec![format!("0..{}", self.n_layers)];
        eprintln!("demo: waiting for {} nodes to cover {} layers", self.ranges.len(), self.n_layers);
        loop {
            children.check()?;
            if let Ok(resp) = client.get(format!("{base}/v1/models")).send().await
                && let Ok(list) = resp.json::<serde_json::Value>().await
            {
                let cards = ["data", "partial"].iter().filter_map(|k| list[k].as_array()).flatten();
                for card in cards {
                    let cov = &card["coverage"];
                    if cov["routable"].as_bool() == Some(true) {
                        return Ok(card["id"].as_str().unwrap_or_default().to_string());
                    }
                    if let Some(m) = cov["missing"].as_array() {
                        last_missing = m.iter().filter_map(|v| v.as_str().map(String::from)).collect();
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the swarm did not cover every layer within {} s; missing layers {}.\n{}",
                    self.args.timeout,
                    last_missing.join(", "),
                    children.log_report()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn interrupted() -> Result<()> {
    eprintln!("demo: interrupted; stopping");
    Ok(())
}

/// Reads the coordinator's stdout (copying it into its log) until its HTTP and p2p addresses are known.
async fn coordinator_addrs(stdout: Option<ChildStdout>, children: &mut Children) -> Result<CoordinatorAddrs> {
    let stdout = stdout.context("the coordinator's stdout was not captured")?;
    let log = children.0.last().map(|c| c.log.clone()).context("no coordinator")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut log = std::fs::OpenOptions::new().append(true).open(&log).ok();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    let (mut p2p, mut http) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while p2p.is_none() || http.is_none() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => {
                if let Some(a) = line.strip_prefix("p2p listening on ") {
                    p2p.get_or_insert_with(|| a.trim().to_string());
                } else if let Some(a) = line.strip_prefix("http listening on http://") {
                    http = Some(a.trim().to_string());
                }
            }
            Ok(None) => {
                // Its stdout closed: it exited (or is exiting). Give it a moment so the status is known.
                for _ in 0..20 {
                    children.check()?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                bail!("the coordinator closed its output before printing its addresses.\n{}", children.log_report());
            }
            Err(_) => {
                bail!("the coordinator printed no addresses within 60 s.\n{}", children.log_report())
            }
        }
    }
    Ok(CoordinatorAddrs { p2p: p2p.unwrap_or_default(), http: http.unwrap_or_default() })
}

/// Returns (with an error) as soon as a child exits.
async fn watch_children(children: &mut Children) -> Result<()> {
    loop {
        children.check()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Streams the answer to `prompt` from the chat endpoint to stdout.
async fn chat(client: &reqwest::Client, base: &str, model: &str, prompt: &str, max_tokens: usize) -> Result<()> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": true,
    });
    let mut resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .context("sending the chat request")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("the chat request failed with {status}: {text}");
    }
    let mut pending = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = resp.chunk().await.context("reading the answer")? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                writeln!(out)?;
                return Ok(());
            }
            let event: serde_json::Value =
                serde_json::from_str(data).with_context(|| format!("reading the event {data}"))?;
            if let Some(e) = event.get("error") {
                bail!("the swarm failed while answering: {e}");
            }
            if let Some(text) = event["choices"][0]["delta"]["content"].as_str() {
                write!(out, "{text}")?;
                out.flush()?;
            }
        }
    }
    bail!("the answer stream ended without [DONE]")
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The processes the demo started; stopped (and reaped) on `stop` or when dropped.
#[derive(Default)]
struct Children(Vec<Proc>);

impl Children {
    /// Starts `exe args…` with stdout and stderr into `log` (stdout piped back instead for the coordinator, the
    /// first child, whose addresses are read from it).
    fn spawn(&mut self, exe: &Path, name: &str, args: &[&str], log: &Path) -> Result<Option<ChildStdout>> {
        // Append mode: the coordinator's stdout reaches the same file through another descriptor (the reader thread),
        // and each write must land at the end, not at this descriptor's own offset.
        File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let file =
            std::fs::OpenOptions::new().append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
        let pipe = self.0.is_empty();
        let mut cmd = Command::new(exe);
        cmd.args(args).stdin(Stdio::null()).stderr(file.try_clone()?);
        if pipe {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(file);
        }
        // Their own process group: a Ctrl-C in the terminal reaches only the demo, which then stops them in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take();
        self.0.push(Proc { name: name.to_string(), child, log: log.to_path_buf() });
        Ok(stdout)
    }

    fn pids(&self) -> String {
        self.0.iter().map(|p| format!("{} {}", p.name, p.child.id())).collect::<Vec<_>>().join(", ")
    }

    /// An error naming the first child that has exited, with its last log lines.
    fn check(&mut self) -> Result<()> {
        for p in &mut self.0 {
            if let Some(status) = p.child.try_wait().context("checking a child process")? {
                bail!(
                    "the {} (pid {}) exited ({status}); last lines of {}:\n{}",
                    p.name,
                    p.child.id(),
                    p.log.display(),
                    tail(&p.log, 15)
                );
            }
        }
        Ok(())
    }

    fn log_report(&self) -> String {
        self.0
            .iter()
            .map(|p| format!("last lines of {} ({}):\n{}", p.log.display(), p.name, tail(&p.log, 8)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGINT to every child (they shut down as on Ctrl-C), SIGKILL to those still running after 5 s; reaps all.
    fn stop(&mut self) {
        for p in &self.0 {
            interrupt(&p.child);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.0 {
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file, indented.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    if lines.is_empty() {
        return "    (empty)".to_string();
    }
    lines[from..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// SIGINT: the children shut down as on Ctrl-C.
fn interrupt(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else { return };
    // SAFETY: kill(2) with a pid of a child we have not reaped yet (so it cannot name another process) and a valid
    // signal number; it touches no memory of ours.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
}

/// Makes the kernel send SIGTERM to the child when this process dies (Linux), so no child outlives a demo that was
/// killed without a chance to clean up.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the hook runs in the forked child before exec; it only calls prctl(2) and getppid(2), which are
    // async-signal-safe, and allocates nothing (an `io::Error` from an OS code holds just the code).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then the signal will never come.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

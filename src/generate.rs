//! `shardline generate`: tokenise, run every layer in this process, stream or print JSON.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::Multiaddr;
use serde::Serialize;
use shardline_coordinator::routing::CoveragePolicy;
use shardline_coordinator::{SwarmClient, SwarmClientConfig};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DeviceKind, SamplingParams};
use shardline_node::batched;
use shardline_node::engine::{Engine, TextStream, encode_prompt, load_tokenizer, stop_tokens};
use shardline_node::generate::{self, GenerateParams, Generation};
use shardline_node::model::{LayerRange, ModelFiles, ModelId, ShardOptions};
use shardline_node::tokenizer::Tokenizer;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// GGUF file or Hugging Face model directory (default: SmolLM2-135M-Instruct from the model cache).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompts_file", conflicts_with = "prompts_file")]
    pub prompt: Option<String>,
    /// Generate from every line of this file (blank lines skipped), batched together: the generations run at once
    /// through one continuous-batching scheduler, each producing the tokens it produces alone. Prints one result per
    /// prompt, in file order (with `--json`: one JSON object per line).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// With `--prompts-file`: most generations running at once (the others start as these finish); lowered to what
    /// the KV cache holds.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub parallel: u64,
    /// Render the prompt as a user message of the model's chat template.
    #[arg(long, overrides_with = "no_chat")]
    pub chat: bool,
    /// Use the prompt as it is (undoes a `chat = true` of the config file).
    #[arg(long, overrides_with = "chat")]
    pub no_chat: bool,
    /// Most tokens to generate (0: none, only the prompt is read).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string is generated (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long, overrides_with = "no_json")]
    pub json: bool,
    /// Stream text (undoes a `json = true` of the config file).
    #[arg(long, overrides_with = "json")]
    pub no_json: bool,
    /// Compute device: `cpu`, `cuda` (alias `gpu`) or `cuda:N` (default: CUDA when a usable GPU is found, else CPU).
    #[arg(long, value_parser = crate::args::device)]
    pub device: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run the model as these consecutive shards in one process, e.g. `0..10,10..30` (default: one shard).
    #[arg(long, value_delimiter = ',')]
    pub shards: Vec<LayerRange>,
    /// Run through a swarm instead of in this process: a peer to join, as a multiaddr
    /// (`/ip4/10.0.0.1/tcp/4000`, the coordinator's `p2p listening on` line); repeatable. `--model` then only
    /// supplies the tokenizer and the model id (no weights are loaded).
    #[arg(long, value_parser = crate::args::multiaddr)]
    pub swarm: Vec<Multiaddr>,
    /// With `--swarm`: the longest wait for the swarm, in seconds: for nodes covering every layer at the start, and
    /// for a working route again after a stage fails. Past it the command fails, naming what is missing.
    #[arg(long, default_value_t = 30)]
    pub swarm_timeout: u64,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    /// The prompt's line among the non-blank lines of `--prompts-file` (absent for `--prompt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

/// The model path given (checked: a file, or a Hugging Face directory), or the default model with a message saying
/// how to fetch it.
pub fn resolve_model(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => {
            crate::args::check_model_path(&p)?;
            Ok(p)
        }
        None => shardline_node::default_model::locate_default_model().map_err(anyhow::Error::msg),
    }
}

/// The device asked for (or the best one present), with `threads` CPU threads when it is the CPU.
pub fn select_backend(device: Option<&str>, threads: Option<usize>) -> Result<Arc<dyn Backend>> {
    let backend = shardline_kernels::device::select_backend(device).with_context(|| match device {
        Some(d) => format!("cannot compute on `--device {d}` (accepted: {})", crate::args::DEVICE_VALUES),
        None => "selecting the compute device".to_string(),
    })?;
    Ok(match threads {
        Some(t) if backend.kind() == DeviceKind::Cpu => Arc::new(CpuBackend::new(t.max(1))),
        _ => backend,
    })
}

fn generate_params(args: &GenerateArgs, tokenizer: &Tokenizer) -> GenerateParams {
    GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens: stop_tokens(tokenizer),
        stop_strings: args.stop.clone(),
        ..GenerateParams::default()
    }
}

/// Streams text to stdout unless `--json`; a closed stdout (piped into `head`) ends generation instead of failing.
fn text_sink(json: bool) -> impl FnMut(&str) -> bool + Send + 'static {
    move |text| {
        if json {
            return true;
        }
        let mut o = std::io::stdout().lock();
        write!(o, "{text}").and_then(|_| o.flush()).is_ok()
    }
}

fn report(generation: &Generation, json: bool) -> Result<()> {
    report_one(generation, json, None)
}

fn report_one(generation: &Generation, json: bool, index: Option<usize>) -> Result<()> {
    let mut o = std::io::stdout().lock();
    if json {
        let out = JsonOutput {
            index,
            prompt_tokens: &generation.prompt_tokens,
            tokens: &generation.tokens,
            text: &generation.text,
            prefill_tokens_per_s: generation.prefill_tokens_per_s(),
            decode_tokens_per_s: generation.decode_tokens_per_s(),
        };
        writeln!(o, "{}", serde_json::to_string(&out)?)?;
    } else {
        let _ = writeln!(o);
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s decode]",
            generation.prompt_tokens.len(),
            generation.prefill_tokens_per_s(),
            generation.tokens.len(),
            generation.decode_tokens_per_s()
        );
    }
    Ok(())
}

fn check_sampling(args: &GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    Ok(())
}

/// The model's human name: its file name without `.gguf`, or its directory's name (as the API serves it).
pub fn model_name(path: &std::path::Path) -> String {
    shardline_node::model::display_name(path)
}

/// The prompt texts: `--prompt`, or the non-blank lines of `--prompts-file`.
fn prompt_texts(args: &GenerateArgs) -> Result<Vec<String>> {
    match (&args.prompt, &args.prompts_file) {
        (Some(p), _) => Ok(vec![p.clone()]),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let prompts: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
            if prompts.is_empty() {
                bail!("{} holds no prompt (one per line)", path.display());
            }
            Ok(prompts)
        }
        (None, None) => bail!("give --prompt or --prompts-file"),
    }
}

/// Prints each prompt's generation in order (a header line before each in text mode); fails naming the prompts
/// that failed, after printing the others.
fn report_many(results: Vec<Result<Generation, shardline_node::ModelError>>, json: bool) -> Result<()> {
    let mut failed = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(g) => {
                if !json {
                    println!("--- prompt {i} ---");
                    print!("{}", g.text);
                }
                report_one(&g, json, Some(i))?;
            }
            Err(e) => {
                eprintln!("prompt {i}: {e:#}");
                failed.push(i);
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} of the prompts failed (lines {failed:?} of the non-blank lines)", failed.len());
    }
    Ok(())
}

/// `--max-tokens 0`: the prompt is read (tokenised) and nothing is generated; no weights are loaded.
fn run_empty(args: &GenerateArgs) -> Result<()> {
    let path = resolve_model(args.model.clone())?;
    let files = ModelFiles::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let tokenizer = load_tokenizer(&files)?;
    let many = args.prompts_file.is_some();
    for (i, text) in prompt_texts(args)?.iter().enumerate() {
        let prompt = encode_prompt(&tokenizer, text, args.chat)?;
        let generation = Generation {
            prompt_tokens: prompt,
            tokens: Vec::new(),
            samples: Vec::new(),
            text: String::new(),
            finish: generate::FinishReason::Length,
            prefill_secs: 0.0,
            decode_secs: 0.0,
        };
        report_one(&generation, args.json, many.then_some(i))?;
    }
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_sampling(&args)?;
    if args.max_tokens == 0 {
        return run_empty(&args);
    }
    if !args.swarm.is_empty() {
        if args.prompts_file.is_some() {
            bail!("--prompts-file runs in this process only (not with --swarm)");
        }
        return run_swarm(args);
    }
    let texts = prompt_texts(&args)?;
    let path = resolve_model(args.model.clone())?;
    let backend = select_backend(args.device.as_deref(), args.threads)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(path.display().to_string());
    let engine = Engine::load(&path, backend, &args.shards, ShardOptions::default(), &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading {}", path.display()))?;
    bar.finish_and_clear();

    let params = generate_params(&args, engine.tokenizer());
    if args.prompts_file.is_some() {
        let prompts = texts.iter().map(|t| engine.prompt_tokens(t, args.chat)).collect::<Result<Vec<_>, _>>()?;
        let start = std::time::Instant::now();
        let out = batched::generate_many(&engine, &prompts, &params, args.parallel as usize)?;
        let secs = start.elapsed().as_secs_f64();
        let generated: usize = out.results.iter().flatten().map(|g| g.tokens.len()).sum();
        eprintln!(
            "[{} prompts, {} at once: {generated} tokens generated in {secs:.2} s ({:.1} tok/s over all); {} batched \
             forwards, up to {} sessions in one]",
            prompts.len(),
            out.parallel,
            generated as f64 / secs.max(1e-9),
            out.batches,
            out.peak_batch
        );
        return report_many(out.results, args.json);
    }
    let prompt = engine.prompt_tokens(&texts[0], args.chat)?;
    let generation = engine.generate(&prompt, &params, &mut text_sink(args.json))?;
    report(&generation, args.json)
}

/// The same generation loop over a swarm session: tokenizer and model id from the local model file, layers on the
/// nodes the DHT knows.
fn run_swarm(args: GenerateArgs) -> Result<()> {
    let path = resolve_model(args.model.clone())?;
    let files = ModelFiles::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let tokenizer = Arc::new(load_tokenizer(&files)?);
    let model_id = ModelId::of_files(&files)?.to_hex();
    let prompt = encode_prompt(&tokenizer, &prompt_texts(&args)?[0], args.chat)?;
    let context = files.config().context_length;
    if prompt.len() + args.max_tokens > context {
        bail!(
            "prompt of {} tokens plus {} new tokens exceeds the context of {context} tokens",
            prompt.len(),
            args.max_tokens
        );
    }
    let params = generate_params(&args, &tokenizer);
    let name = model_name(&path);
    let wait = Duration::from_secs(args.swarm_timeout);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let generation = rt.block_on(async {
        let mut config = SwarmClientConfig::new(model_id.clone(), args.swarm.clone());
        // `--swarm-timeout` bounds every wait for the swarm, the route of a failover included.
        config.policy = CoveragePolicy::WaitAndRetry { timeout: wait };
        let client = SwarmClient::join(config).await.context("joining the swarm")?;
        client.registry().name_model(&model_id, &name);
        client
            .wait_for_coverage(wait)
            .await
            .with_context(|| format!("no route through the swarm within --swarm-timeout {}s", args.swarm_timeout))?;
        let mut session = client.session(prompt.len() + params.max_tokens, params.sampling, params.n_top_logprobs);
        let mut decoder = TextStream::new(tokenizer);
        let mut sink = text_sink(args.json);
        let generation = generate::generate(&mut session, &prompt, &params, &mut decoder, &mut sink).await;
        // Tell every stage the session is over (they free its KV cache) before the process exits.
        session.close().await;
        client.shutdown(Duration::from_secs(1)).await;
        anyhow::Ok(generation.with_context(|| {
            format!(
                "generating through the swarm (each wait for it bounded by --swarm-timeout {}s)",
                args.swarm_timeout
            )
        })?)
    })?;
    report(&generation, args.json)
}

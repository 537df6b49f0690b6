//! `shardline generate`: tokenise, run every layer in this process, stream or print JSON.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DeviceKind, SamplingParams};
use shardline_node::engine::{Engine, stop_tokens};
use shardline_node::generate::GenerateParams;
use shardline_node::model::{LayerRange, ShardOptions};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// GGUF file or Hugging Face model directory (default: SmolLM2-135M-Instruct from the model cache).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message of the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 1.0)]
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
    #[arg(long)]
    pub json: bool,
    /// Compute device: `cpu`, `cuda` or `cuda:N` (default: CUDA when a usable GPU is found, else CPU).
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run the model as these consecutive shards in one process, e.g. `0..10,10..30` (default: one shard).
    #[arg(long, value_delimiter = ',')]
    pub shards: Vec<LayerRange>,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

/// The model path given, or the default model with a message saying how to fetch it.
pub fn resolve_model(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p),
        None => shardline_node::default_model::locate_default_model().map_err(anyhow::Error::msg),
    }
}

/// The device asked for (or the best one present), with `threads` CPU threads when it is the CPU.
pub fn select_backend(device: Option<&str>, threads: Option<usize>) -> Result<Arc<dyn Backend>> {
    let backend = shardline_kernels::device::select_backend(device).context("selecting the compute device")?;
    Ok(match threads {
        Some(t) if backend.kind() == DeviceKind::Cpu => Arc::new(CpuBackend::new(t.max(1))),
        _ => backend,
    })
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let path = resolve_model(args.model)?;
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

    let prompt = engine.prompt_tokens(&args.prompt, args.chat)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens: stop_tokens(engine.tokenizer()),
        stop_strings: args.stop.clone(),
        ..GenerateParams::default()
    };
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let streaming = !args.json;
    let out = stdout.clone();
    let generation = engine.generate(&prompt, &params, &mut |text| {
        if streaming {
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            // A closed stdout (e.g. piped into `head`) ends generation instead of failing it.
            return write!(o, "{text}").and_then(|_| o.flush()).is_ok();
        }
        true
    })?;
    let mut o = stdout.lock().unwrap_or_else(|e| e.into_inner());
    if args.json {
        let json = JsonOutput {
            prompt_tokens: &generation.prompt_tokens,
            tokens: &generation.tokens,
            text: &generation.text,
            prefill_tokens_per_s: generation.prefill_tokens_per_s(),
            decode_tokens_per_s: generation.decode_tokens_per_s(),
        };
        writeln!(o, "{}", serde_json::to_string(&json)?)?;
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

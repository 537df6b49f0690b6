//! The OpenAI-compatible HTTP API of the coordinator (axum): `POST /v1/completions`, `POST /v1/chat/completions`
//! (JSON or server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics`, `GET /v1/swarm` (and its live
//! stream `GET /v1/swarm/events`), and the dashboard page at `GET /` (`dashboard.rs`).
//!
//! The coordinator holds no weights: each served model is opened from a local copy of its file for the tokenizer,
//! the chat template and the model id only, and its sessions run over the coordinator's registry. The path of a
//! request: `routes.rs` (parse, validate, tokenise) → `generation.rs` (an async task running the engine's generation
//! loop over a `SwarmSession`) → `sse.rs` or a JSON body; failures become `error.rs`'s OpenAI-shaped errors.

pub mod dashboard;
pub mod error;
pub mod generation;
pub mod logprobs;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod sse;
pub mod swarm;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shardline_node::ModelError;
use shardline_node::engine::load_tokenizer;
use shardline_node::model::{LayerRange, ModelFiles, ModelId};
use shardline_node::tokenizer::Tokenizer;

use crate::client::{ClientError, SwarmClient, SwarmClientConfig};
use crate::registry::{ModelShape, NodeRegistry};
use crate::routing::{self, CoveragePolicy, RouteError};
use crate::run::CoordinatorHandle;

pub use error::ApiError;
pub use metrics::Metrics;
pub use routes::router;

/// Tunables of the API.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// How long a request may wait in a saturated node's queue before it is refused with 429.
    pub admit_wait: Duration,
    /// `Retry-After` sent with 429, in seconds.
    pub retry_after_secs: u64,
    /// `max_tokens` of a completion that names none (OpenAI's default is 16).
    pub default_completion_tokens: usize,
    /// Most new tokens of a chat completion that names no `max_tokens`: every stage reserves KV cache for the whole
    /// session at admission, so "up to the context" would let one request hold a node's whole cache.
    pub default_chat_tokens: usize,
    /// Positions per prefill frame sent to the first stage.
    pub prefill_chunk: usize,
    /// Longest wait for a streaming reader to take the next text event before the generation counts it as gone
    /// and closes the session, freeing its slots and KV cache on every stage; `None` waits as long as the reader
    /// takes (see `generation.rs`). A client that stops reading otherwise holds a slot on each stage of its route.
    pub send_timeout: Option<Duration>,
    /// Longest time a connection may take to send a request's head (request line and headers); then it is closed.
    /// Without it, half-sent heads hold connections open forever (slowloris).
    pub header_timeout: Duration,
    /// Longest time to receive a request's whole body once its head arrived (a total, not per read, so a client
    /// trickling one byte at a time is cut off too); answered with 408.
    pub body_timeout: Duration,
    /// Most HTTP connections served at once; further ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Most bytes of prompt text (all chat messages together) accepted before tokenising; `None`:
    /// [`PROMPT_BYTES_PER_TOKEN`] per token of the model's context, more than any prompt that fits could hold.
    pub max_prompt_bytes: Option<usize>,
}

/// Bytes of prompt text per context token beyond which a prompt cannot fit (English averages about 4 bytes per
/// token; 32 leaves room for long tokens such as runs of spaces).
pub const PROMPT_BYTES_PER_TOKEN: usize = 32;

/// Most bytes of a request body (axum's default limit for a body read whole).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Prompts tokenised at once on the blocking pool; more wait their turn.
const TOKENISE_SLOTS: usize = 4;

impl ApiConfig {
    /// The prompt byte limit for a model of `context_length` tokens.
    pub fn max_prompt_bytes(&self, context_length: usize) -> usize {
        self.max_prompt_bytes.unwrap_or_else(|| context_length.saturating_mul(PROMPT_BYTES_PER_TOKEN))
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            admit_wait: Duration::from_secs(30),
            retry_after_secs: 1,
            default_completion_tokens: 16,
            default_chat_tokens: 1024,
            prefill_chunk: 64,
            send_timeout: Some(Duration::from_secs(15)),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_prompt_bytes: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiSetupError {
    #[error("cannot open the model: {0}")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A model the API serves: its tokenizer and shape from the local file, its sessions over the swarm.
pub struct ServedModel {
    /// The name clients use (`model` field): the file name without `.gguf`, or the directory name.
    pub name: String,
    /// When the model file was last written, in seconds since the Unix epoch (`created` of `GET /v1/models`).
    pub created: u64,
    /// The swarm's content digest of the model; accepted as a name too.
    pub model_id: String,
    pub tokenizer: Arc<Tokenizer>,
    /// Context length in tokens (prompt + generated).
    pub context_length: usize,
    pub n_layers: usize,
    client: SwarmClient,
}

impl ServedModel {
    /// Opens the model file at `path` (metadata and tokenizer; no weights are loaded) and serves it through the
    /// coordinator's registry. Requests fail at once (503) when layers are missing rather than waiting for nodes.
    pub fn open(path: &Path, coordinator: &CoordinatorHandle, config: &ApiConfig) -> Result<Self, ApiSetupError> {
        let files = ModelFiles::open(path)?;
        let tokenizer = Arc::new(load_tokenizer(&files)?);
        let model_id = ModelId::of_files(&files)?.to_hex();
        let name = shardline_node::model::display_name(path);
        coordinator.registry.name_model(&model_id, &name);
        let created = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        // The file tells the model's true shape: nodes announcing another one for this id can never block it.
        let config_shape =
            ModelShape { n_layers: files.config().n_layers as u32, hidden: files.config().hidden as u32 };
        coordinator.registry.pin_shape(&model_id, config_shape);
        coordinator.discovery.watch(&model_id);
        let mut cfg = SwarmClientConfig::new(model_id.clone(), Vec::new());
        cfg.policy = CoveragePolicy::FailFast;
        cfg.admit_wait = config.admit_wait;
        cfg.prefill_chunk = config.prefill_chunk;
        let client = SwarmClient::with_registry(coordinator.dht.clone(), coordinator.registry.clone(), cfg)?;
        Ok(Self {
            name,
            created,
            model_id,
            tokenizer,
            context_length: files.config().context_length,
            n_layers: files.config().n_layers,
            client,
        })
    }

    /// Layer ranges no usable registered node serves now (empty when the model is routable).
    pub fn missing_layers(&self, registry: &NodeRegistry) -> Vec<LayerRange> {
        let full = vec![LayerRange::full(self.n_layers)];
        if registry.model_shape(&self.model_id).is_none() {
            return full;
        }
        let cands = routing::coverage_candidates(registry, &self.model_id);
        match routing::plan(&self.model_id, &cands, self.n_layers, &HashSet::new(), 0) {
            Ok(_) => Vec::new(),
            Err(RouteError::Uncovered { missing, .. }) => missing,
            Err(RouteError::UnknownModel { .. }) => full,
        }
    }
}

/// Everything the handlers share.
pub struct ApiState {
    pub models: Vec<Arc<ServedModel>>,
    pub registry: Arc<NodeRegistry>,
    pub metrics: Arc<Metrics>,
    pub config: ApiConfig,
    /// Bounds the prompts tokenised at once (`routes.rs`).
    pub(crate) tokenise_slots: tokio::sync::Semaphore,
}

impl ApiState {
    /// Serves each model file in `models` over the coordinator's registry.
    pub fn open(
        coordinator: &CoordinatorHandle,
        models: &[impl AsRef<Path>],
        config: ApiConfig,
    ) -> Result<Arc<Self>, ApiSetupError> {
        let models = models
            .iter()
            .map(|p| ServedModel::open(p.as_ref(), coordinator, &config).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            models,
            registry: coordinator.registry.clone(),
            metrics: Arc::new(Metrics::default()),
            config,
            tokenise_slots: tokio::sync::Semaphore::new(TOKENISE_SLOTS),
        }))
    }

    /// The served model called `name` (its name or its model id).
    pub fn model(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models.iter().find(|m| m.name == name || m.model_id == name).cloned()
    }
}

/// Serves the API on `listener` until the future is dropped or the listener fails: HTTP/1.1 with a header read
/// timeout and at most `max_connections` connections (`axum::serve` has neither); the body timeout is applied where
/// bodies are read (`routes.rs`).
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ApiState>) -> std::io::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(state.config.header_timeout);
    let app = router(state);
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return Ok(()) };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            // Out of file descriptors and the like: the listener itself is fine, try again shortly.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Accept errors that concern one connection or a passing shortage, not the listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

/// Seconds since the Unix epoch (`created` fields).
pub(crate) fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

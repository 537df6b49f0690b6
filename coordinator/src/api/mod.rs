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
    /// and closes the session; `None` waits as long as the reader takes (see `generation.rs`).
    pub send_timeout: Option<Duration>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            admit_wait: Duration::from_secs(30),
            retry_after_secs: 1,
            default_completion_tokens: 16,
            default_chat_tokens: 1024,
            prefill_chunk: 64,
            send_timeout: None,
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
        }))
    }

    /// The served model called `name` (its name or its model id).
    pub fn model(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models.iter().find(|m| m.name == name || m.model_id == name).cloned()
    }
}

/// Serves the API on `listener` until the future is dropped or the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ApiState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

/// Seconds since the Unix epoch (`created` fields).
pub(crate) fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

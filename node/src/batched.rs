//! Several generations at once in this process, through the same continuous batching as a stage: the engine's
//! shards become stage cores wired in memory ([`LocalSwarm`]), and every generation is an owner of its own session.
//! One thread per running generation drives the ordinary generation loop ([`generate::generate`]) over a
//! [`BatchSession`]; a step does not run on its own: the threads meet at a rendezvous, and when every running
//! generation has handed in its next input the last one to arrive runs the stages once, so each step of a stage is
//! one `Shard::forward_batch` over every generation's next rows (decode rows first, prompt chunks up to the token
//! budget: `stage/core/schedule.rs`). Generations join and leave between steps. Each one's tokens are those it
//! draws alone: the batched forward is row-independent (`node/tests/shard_batch.rs`) and sampling is a function of
//! `(seed, position)` (docs/ARCHITECTURE.md, "Determinism").

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};
use shardline_kernels::{Sampled, SamplingParams};
use shardline_proto::wire::{ErrorCode, Frame, Hop, SessionId, SessionKey, SessionOpen, StageData, TokenResult};

use crate::engine::{Engine, TextStream};
use crate::error::{ModelError, Result};
use crate::generate::{self, GenerateParams, Generation, Stepper};
use crate::model::LayerRange;
use crate::stage::local::ClientStream;
use crate::stage::{LocalSwarm, ShardStage, StageConfig};
use crate::wire_convert::{sampling_to_wire, wire_dtype_of};

/// The model id the in-memory stages answer to (nothing outside this process sees it).
const MODEL_ID: &str = "local";

/// The in-memory stages and who is waiting on them.
struct Driver {
    swarm: LocalSwarm<Arc<ShardStage>>,
    /// Generations that will hand in an input before the next run (threads still working).
    active: usize,
    /// Of those, the ones that handed theirs in and wait for the run.
    waiting: usize,
    /// Runs done so far: a waiting thread's input has been through the stages once this moves.
    round: u64,
    /// The last step computed nothing: whoever still waits for an answer will not get one.
    stalled: bool,
    next_session: SessionId,
}

impl Driver {
    /// One scheduler step of every stage (`LocalSwarm::step`): each computes at most one batch, so a generation that
    /// answers its token at once is in the next batch, and a long prompt cut into chunks lets the others decode
    /// between its chunks.
    fn run(&mut self, done: &Condvar) {
        self.stalled = !self.swarm.step();
        self.round += 1;
        self.waiting = 0;
        done.notify_all();
    }
}

/// The engine's shards as stage cores, shared by the threads of a batch.
struct Batch {
    driver: Mutex<Driver>,
    done: Condvar,
    /// Address and layers of each stage, in model order.
    stages: Vec<(SocketAddr, LayerRange)>,
    n_layers: usize,
    hidden: usize,
    wire_dtype: shardline_proto::wire::WireDType,
}

impl Batch {
    /// Hands in what `send` writes to the stages, then takes part in steps until `recv` finds the answer. A step
    /// runs when every running generation has handed in its input or waits for an answer; the last to arrive runs
    /// it for all of them.
    fn exchange<T>(
        &self,
        send: impl FnOnce(&mut LocalSwarm<Arc<ShardStage>>),
        mut recv: impl FnMut(&mut LocalSwarm<Arc<ShardStage>>, bool) -> Option<T>,
    ) -> T {
        let mut d = self.driver.lock();
        send(&mut d.swarm);
        loop {
            d.waiting += 1;
            let round = d.round;
            if d.waiting >= d.active {
                d.run(&self.done);
            } else {
                while d.round == round {
                    self.done.wait(&mut d);
                }
            }
            let stalled = d.stalled;
            if let Some(t) = recv(&mut d.swarm, stalled) {
                return t;
            }
        }
    }

    /// Writes to the stages without waiting for a step (a prompt chunk that samples nothing: its errors come back
    /// with the session's next answer).
    fn send(&self, send: impl FnOnce(&mut LocalSwarm<Arc<ShardStage>>)) {
        send(&mut self.driver.lock().swarm);
    }

    /// A thread stops taking part (its queue of prompts is empty): the others no longer wait for it.
    fn leave(&self) {
        let mut d = self.driver.lock();
        d.active = d.active.saturating_sub(1);
        if d.waiting > 0 && d.waiting >= d.active {
            d.run(&self.done);
        }
    }
}

/// Calls [`Batch::leave`] however the thread ends.
struct Leave<'a>(&'a Batch);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// One generation's session over the in-memory stages: a control stream to every stage, prompt and decode inputs
/// into the first, tokens back from the last.
pub struct BatchSession<'a> {
    batch: &'a Batch,
    session: SessionId,
    /// One per stage, in model order.
    clients: Vec<ClientStream>,
    /// Positions handed in so far.
    position: u64,
    /// The prompt's last chunk has been sent (later inputs are decode steps).
    prefilled: bool,
}

fn refused(code: ErrorCode, message: String) -> ModelError {
    match code {
        ErrorCode::BadRequest => ModelError::Invalid(message),
        _ => ModelError::Invalid(format!("{code:?}: {message}")),
    }
}

/// The first frame on any of `clients` that is an error, as a model error.
fn first_error(swarm: &mut LocalSwarm<Arc<ShardStage>>, clients: &[ClientStream]) -> Option<ModelError> {
    for c in clients {
        while let Some(f) = swarm.recv(*c) {
            if let Frame::Error { code, message, .. } = f {
                return Some(refused(code, message));
            }
        }
    }
    None
}

impl<'a> BatchSession<'a> {
    /// Opens a session of at most `max_tokens` positions on every stage (the last first, so each stage can attach
    /// to the next one when it sees its open).
    fn open(batch: &'a Batch, max_tokens: usize, sampling: &SamplingParams, n_top: usize) -> Result<Self> {
        let n = batch.stages.len();
        let (session, clients) = {
            let mut d = batch.driver.lock();
            d.next_session += 1;
            let session = d.next_session;
            let mut clients = Vec::with_capacity(n);
            for (addr, _) in batch.stages.iter().rev() {
                let c = d.swarm.connect(*addr).ok_or_else(|| ModelError::Invalid(format!("no stage at {addr}")))?;
                clients.push(c);
            }
            clients.reverse();
            (session, clients)
        };
        let max_tokens = u32::try_from(max_tokens).map_err(|_| ModelError::Invalid("max_tokens too large".into()))?;
        let opens: Vec<Frame> = (0..n)
            .map(|k| {
                let (_, span) = batch.stages[k];
                let rest = batch.stages[k + 1..]
                    .iter()
                    .map(|(addr, layers)| Hop { layers: *layers, addr: *addr, fingerprint: [0; 32] })
                    .collect();
                Frame::Open {
                    session,
                    open: SessionOpen {
                        model_id: MODEL_ID.into(),
                        n_layers: batch.n_layers as u32,
                        span,
                        max_tokens,
                        sampling: sampling_to_wire(sampling),
                        n_top: u8::try_from(n_top).unwrap_or(u8::MAX),
                        wire_dtype: batch.wire_dtype,
                        hidden: batch.hidden as u32,
                        rest,
                        attach_key: SessionKey::default(),
                        next_key: SessionKey::default(),
                        next_record: Vec::new(),
                    },
                }
            })
            .collect();
        let opened = batch.exchange(
            |swarm| {
                for (c, f) in clients.iter().zip(opens).rev() {
                    swarm.send(*c, f);
                }
            },
            |swarm, _| {
                // Opening needs no compute: one step carries the opens and attaches through every stage.
                for c in &clients {
                    match swarm.recv(*c) {
                        Some(Frame::Opened { .. }) => {}
                        Some(Frame::Error { code, message, .. }) => return Some(Err(refused(code, message))),
                        other => {
                            let msg = format!("the stage did not open the session: {other:?}");
                            return Some(Err(ModelError::Invalid(msg)));
                        }
                    }
                }
                Some(Ok(()))
            },
        );
        let s = Self { batch, session, clients, position: 0, prefilled: false };
        match opened {
            Ok(()) => Ok(s),
            Err(e) => {
                // Stages that did open free the session at their next run.
                s.close();
                Err(e)
            }
        }
    }

    fn first(&self) -> ClientStream {
        self.clients[0]
    }

    fn last(&self) -> ClientStream {
        self.clients[self.clients.len() - 1]
    }

    /// Hands `frame` to the first stage and waits for the token the last stage sends back for it.
    fn input(&mut self, frame: Frame, n: usize) -> Result<TokenResult> {
        self.position += n as u64;
        let (first, last) = (self.first(), self.last());
        let clients = &self.clients;
        self.batch.exchange(
            |swarm| swarm.send(first, frame),
            |swarm, stalled| match swarm.recv(last) {
                Some(Frame::Token { result, .. }) => Some(Ok(result)),
                Some(Frame::Error { code, message, .. }) => Some(Err(refused(code, message))),
                Some(other) => Some(Err(ModelError::Invalid(format!("expected a token, the stage sent {other:?}")))),
                None => match first_error(swarm, clients) {
                    Some(e) => Some(Err(e)),
                    None if stalled => Some(Err(ModelError::Invalid("the stages stopped without a token".into()))),
                    None => None,
                },
            },
        )
    }

    /// Ends the session on every stage; the stages free its KV cache at their next run.
    fn close(self) {
        self.batch.send(|swarm| {
            for c in &self.clients {
                swarm.send(*c, Frame::Close { session: self.session });
            }
        });
    }
}

impl Stepper for BatchSession<'_> {
    type Error = ModelError;

    /// Sends the chunk and returns at once: it computes in the steps that the session's next [`Stepper::step`]
    /// waits for, and a failure comes back then.
    async fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        let (session, position, first) = (self.session, self.position, self.first());
        let frame = Frame::Prefill { session, position, last: false, data: StageData::Tokens(tokens.to_vec()) };
        self.position += tokens.len() as u64;
        self.batch.send(|swarm| swarm.send(first, frame));
        Ok(())
    }

    async fn step(&mut self, tokens: &[u32], _: &SamplingParams, _: usize) -> Result<Sampled> {
        let (session, position) = (self.session, self.position);
        let data = StageData::Tokens(tokens.to_vec());
        let frame = if self.prefilled {
            Frame::Decode { session, position, data }
        } else {
            self.prefilled = true;
            Frame::Prefill { session, position, last: true, data }
        };
        let result = self.input(frame, tokens.len())?;
        Ok(Sampled { token: result.token, logprob: result.logprob, top: result.top })
    }
}

/// What [`generate_many`] did.
#[derive(Debug)]
pub struct BatchOutcome {
    /// Prompt `i`'s generation at index `i`.
    pub results: Vec<Result<Generation>>,
    /// Generations run at once (`parallel`, lowered to what the KV cache holds).
    pub parallel: usize,
    /// Most sessions in one batched forward of the first stage.
    pub peak_batch: usize,
    /// Batched forwards the first stage ran.
    pub batches: usize,
}

/// Generates from every prompt of `prompts` with `params`, at most `parallel` at once, batched together.
/// `parallel` is lowered so that every running session's KV cache fits.
pub fn generate_many(
    engine: &Engine,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    parallel: usize,
) -> Result<BatchOutcome> {
    let shards = engine.pipeline().shards();
    let Some(first) = shards.first() else { return Err(ModelError::Invalid("the engine has no shards".into())) };
    let config = first.config().clone();
    let context = config.context_length;
    let need = prompts.iter().map(|p| p.len() + params.max_tokens).max().unwrap_or(1).max(1);
    if let Some(p) = prompts.iter().find(|p| p.len() + params.max_tokens > context) {
        return Err(ModelError::ContextOverflow { tokens: p.len(), max_new: params.max_tokens, context });
    }
    // Whole blocks per session, as the shards reserve them.
    let kv_tokens = shards.iter().map(|s| s.kv_capacity_tokens()).min().unwrap_or(0);
    let fits = kv_tokens / need.next_multiple_of(16).max(1);
    if fits == 0 {
        return Err(ModelError::KvCacheFull { needed: need, free: kv_tokens });
    }
    let workers = parallel.clamp(1, prompts.len().max(1)).min(fits);
    let stage_config = StageConfig {
        max_sessions: workers * 2,
        max_sessions_per_peer: Some(workers * 2),
        // Never park an open: with the sessions bounded by what fits, a full cache is a bug to report, not to wait on.
        max_waiting: 0,
        ..StageConfig::default()
    };
    let mut swarm = LocalSwarm::new();
    // Each stage learns its step cost, so a long prompt beside decoding generations is cut to keep their steps short.
    swarm.time_compute(true);
    let mut stages = Vec::with_capacity(shards.len());
    for (i, shard) in shards.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1 + i as u16));
        swarm.add_stage(addr, Arc::new(ShardStage::new(shard.clone(), MODEL_ID.into())), stage_config.clone());
        stages.push((addr, shard.layers()));
    }
    let batch = Batch {
        driver: Mutex::new(Driver { swarm, active: workers, waiting: 0, round: 0, stalled: false, next_session: 0 }),
        done: Condvar::new(),
        stages,
        n_layers: config.n_layers,
        hidden: config.hidden,
        wire_dtype: wire_dtype_of(first.backend().act_dtype()),
    };
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Generation>>>> = prompts.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let _leave = Leave(&batch);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(prompt) = prompts.get(i) else { break };
                    let out = run_one(&batch, engine, prompt, params);
                    *results[i].lock() = Some(out);
                }
            });
        }
    });
    // The closes of the last sessions, so the shards' KV caches are whole again.
    let stats = {
        let mut d = batch.driver.lock();
        d.swarm.run();
        let first = batch.stages[0].0;
        d.swarm.core(first).map(|c| c.batch_gauge().read()).unwrap_or_default()
    };
    let results = results
        .into_iter()
        .map(|r| r.into_inner().unwrap_or_else(|| Err(ModelError::Invalid("the prompt was not run".into()))))
        .collect();
    Ok(BatchOutcome { results, parallel: workers, peak_batch: stats.peak_sessions, batches: stats.batches })
}

/// One prompt's generation over the batch (text is collected, not streamed).
fn run_one(batch: &Batch, engine: &Engine, prompt: &[u32], params: &GenerateParams) -> Result<Generation> {
    let mut session =
        BatchSession::open(batch, prompt.len() + params.max_tokens, &params.sampling, params.n_top_logprobs)?;
    let mut decoder = TextStream::new(engine.tokenizer().clone());
    let mut sink = |_: &str| true;
    let out = futures::executor::block_on(generate::generate(&mut session, prompt, params, &mut decoder, &mut sink));
    session.close();
    Ok(out?)
}

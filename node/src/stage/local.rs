//! The in-process driver: several stage cores wired together in memory, with clients that speak frames to them. No
//! sockets, no tasks, no clock: streams are queues, compute runs inline on the caller's thread, and time moves only
//! when [`LocalSwarm::advance`] says so. Tests and benches run whole pipelines through the same core as the QUIC
//! server, deterministically. The one exception is opt-in: [`LocalSwarm::time_compute`] measures each compute batch
//! with the real clock for the stages' step-cost model (the engine's batched generation does).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::core::auth::HopPolicy;
use super::core::{Action, Event, Peer, StageCompute, StageConfig, StageCore, StreamId};
use shardline_proto::wire::{Expect, Frame};

/// A client's end of a stream, returned by [`LocalSwarm::connect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientStream(usize);

#[derive(Clone, Copy, Debug)]
enum End {
    Client(usize),
    Stage(usize, StreamId),
}

/// A stage's end of a stream.
struct Pipe {
    peer: End,
    /// Frames written by the peer, not yet read by the core.
    inbox: VecDeque<Frame>,
    peer_finished: bool,
    /// The core asked for a frame that passes this check.
    wants_read: Option<Expect>,
}

struct Stage<M: StageCompute> {
    addr: SocketAddr,
    core: StageCore<M>,
    pipes: HashMap<StreamId, Pipe>,
    next_accepted: u64,
}

struct Client {
    peer: Option<(usize, StreamId)>,
    inbox: VecDeque<Frame>,
    finished: bool,
}

/// Stages addressed by socket address (what `Hop`s name), run in one thread.
pub struct LocalSwarm<M: StageCompute> {
    stages: Vec<Stage<M>>,
    clients: Vec<Client>,
    now: Instant,
    /// Measure each compute batch with the real clock and report it ([`Self::time_compute`]).
    time_compute: bool,
}

impl<M: StageCompute> Default for LocalSwarm<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: StageCompute> LocalSwarm<M> {
    pub fn new() -> Self {
        Self { stages: Vec::new(), clients: Vec::new(), now: Instant::now(), time_compute: false }
    }

    /// Whether each compute batch is timed with the real clock and its time reported to its stage
    /// ([`Event::ComputeTime`]), so that the scheduler bounds the steps that carry decode rows by what steps really
    /// cost (`stage/core/schedule.rs`). Off by default: a run then depends on nothing but its inputs, and each stage
    /// plans by its fixed token budget. The engine's batched generation turns it on.
    pub fn time_compute(&mut self, on: bool) {
        self.time_compute = on;
    }

    /// Adds a stage reachable at `addr` (no socket is bound; only `Hop`s and [`Self::connect`] use it). Its next hops
    /// are not checked against announcements ([`HopPolicy::InProcess`]): a dial here reaches another stage of this
    /// swarm and nothing else, and it never holds a batch back for inputs on their way (`gather_wait` is zero). Each
    /// client stream counts as its own peer for the quotas.
    pub fn add_stage(&mut self, addr: SocketAddr, model: M, mut config: StageConfig) {
        config.next_hops = HopPolicy::InProcess;
        // Every input of a step is delivered before the stage polls, and time stands still: nothing to wait for.
        config.gather_wait = Duration::ZERO;
        self.stages.push(Stage { addr, core: StageCore::new(model, config), pipes: HashMap::new(), next_accepted: 0 });
    }

    /// The core of the stage at `addr`, to look at its sessions.
    pub fn core(&self, addr: SocketAddr) -> Option<&StageCore<M>> {
        self.stages.iter().find(|s| s.addr == addr).map(|s| &s.core)
    }

    /// Opens a stream from a client to the stage at `addr`; `None` if there is no such stage.
    pub fn connect(&mut self, addr: SocketAddr) -> Option<ClientStream> {
        let i = self.stages.iter().position(|s| s.addr == addr)?;
        let c = self.clients.len();
        let stream = self.open_pipe(i, End::Client(c));
        self.clients.push(Client { peer: Some((i, stream)), inbox: VecDeque::new(), finished: false });
        Some(ClientStream(c))
    }

    /// Writes a frame from the client (delivered by the next [`Self::run`]).
    pub fn send(&mut self, c: ClientStream, frame: Frame) {
        if let Some(pipe) = self.client_peer(c) {
            pipe.inbox.push_back(frame);
        }
    }

    /// Finishes the client's send side.
    pub fn finish(&mut self, c: ClientStream) {
        if let Some(pipe) = self.client_peer(c) {
            pipe.peer_finished = true;
        }
    }

    /// Resets the stream from the client's side: the stage sees it lost at once.
    pub fn reset(&mut self, c: ClientStream) {
        if let Some((i, stream)) = self.clients.get_mut(c.0).and_then(|cl| cl.peer.take()) {
            self.stages[i].pipes.remove(&stream);
            let now = self.now;
            self.stages[i].core.handle(now, Event::Lost { stream, reason: "reset by the client".into() });
        }
    }

    /// The next frame the stage wrote to the client, if one is waiting.
    pub fn recv(&mut self, c: ClientStream) -> Option<Frame> {
        self.clients.get_mut(c.0)?.inbox.pop_front()
    }

    /// Whether the stage finished its side of the client's stream and every frame has been received.
    pub fn is_finished(&self, c: ClientStream) -> bool {
        self.clients.get(c.0).is_some_and(|cl| cl.finished && cl.inbox.is_empty())
    }

    /// Lets time pass (timeouts fire) and runs until nothing more happens.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        for s in &mut self.stages {
            s.core.handle(self.now, Event::Tick);
        }
        self.run();
    }

    /// Delivers frames, runs compute and carries out every action until all stages are idle.
    pub fn run(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..self.stages.len() {
                busy |= self.deliver(i);
                while let Some(action) = self.stages[i].core.poll_action() {
                    busy = true;
                    self.act(i, action);
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// One scheduler step: delivers frames and carries out actions until all stages are idle, as [`Self::run`], but
    /// each stage computes at most one batch. What that batch produces is delivered (hidden states to the next
    /// stage, which may compute its own batch in the same step; tokens to the clients), and the batch after it is
    /// left for the next call, so that a client that answers each token at once (an owner sending its next decode)
    /// is in that batch. Returns whether any stage computed.
    pub fn step(&mut self) -> bool {
        let mut computed = vec![false; self.stages.len()];
        loop {
            let mut busy = false;
            for (i, done) in computed.iter_mut().enumerate() {
                busy |= self.deliver(i);
                loop {
                    let core = &mut self.stages[i].core;
                    let action = if *done { core.poll_queued() } else { core.poll_action() };
                    let Some(action) = action else { break };
                    busy = true;
                    *done |= matches!(action, Action::Compute(_));
                    self.act(i, action);
                }
            }
            if !busy {
                return computed.contains(&true);
            }
        }
    }

    /// Answers the reads stage `i` asked for with what its peers wrote.
    fn deliver(&mut self, i: usize) -> bool {
        let now = self.now;
        let stage = &mut self.stages[i];
        let mut events = Vec::new();
        for (id, pipe) in &mut stage.pipes {
            let Some(expect) = pipe.wants_read else { continue };
            if let Some(frame) = pipe.inbox.pop_front() {
                pipe.wants_read = None;
                // The same check the QUIC reader makes on the header before it reads a payload.
                match expect.check(&frame.parts().0) {
                    Ok(()) => events.push(Event::Frame { stream: *id, frame }),
                    Err(e) => events.push(Event::Malformed { stream: *id, error: e.to_string() }),
                }
            } else if pipe.peer_finished {
                pipe.wants_read = None;
                events.push(Event::Finished { stream: *id });
            }
        }
        // Streams in id order, so runs repeat exactly.
        events.sort_by_key(|e| match e {
            Event::Frame { stream, .. } | Event::Finished { stream } | Event::Malformed { stream, .. } => *stream,
            _ => StreamId::Accepted(u64::MAX),
        });
        let any = !events.is_empty();
        for e in events {
            stage.core.handle(now, e);
        }
        any
    }

    fn act(&mut self, i: usize, action: Action<M::Kv>) {
        let now = self.now;
        match action {
            Action::Read { stream, expect } => {
                if let Some(p) = self.stages[i].pipes.get_mut(&stream) {
                    p.wants_read = Some(expect);
                }
            }
            Action::Send { stream, frame } => {
                let peer = self.stages[i].pipes.get(&stream).map(|p| p.peer);
                let delivered = match peer {
                    Some(End::Client(c)) => {
                        self.clients[c].inbox.push_back(frame);
                        true
                    }
                    Some(End::Stage(j, s)) => match self.stages[j].pipes.get_mut(&s) {
                        Some(p) => {
                            p.inbox.push_back(frame);
                            true
                        }
                        None => false,
                    },
                    None => false,
                };
                let event = if delivered {
                    Event::Sent { stream }
                } else {
                    Event::SendFailed { stream, reason: "the peer closed the stream".into() }
                };
                self.stages[i].core.handle(now, event);
            }
            Action::Finish { stream } => {
                if let Some(p) = self.stages[i].pipes.remove(&stream) {
                    match p.peer {
                        End::Client(c) => self.clients[c].finished = true,
                        End::Stage(j, s) => {
                            if let Some(q) = self.stages[j].pipes.get_mut(&s) {
                                q.peer_finished = true;
                            }
                        }
                    }
                }
            }
            Action::Dial { stream, addr, .. } => {
                let result = match self.stages.iter().position(|s| s.addr == addr) {
                    None => Err(format!("no stage at {addr}")),
                    Some(j) => {
                        let accepted = self.open_pipe(j, End::Stage(i, stream));
                        let pipe = Pipe {
                            peer: End::Stage(j, accepted),
                            inbox: VecDeque::new(),
                            peer_finished: false,
                            wants_read: None,
                        };
                        self.stages[i].pipes.insert(stream, pipe);
                        Ok(())
                    }
                };
                self.stages[i].core.handle(now, Event::Dialed { stream, result });
            }
            Action::Compute(batch) => {
                let started = self.time_compute.then(Instant::now);
                let results = self.stages[i].core.model().compute(batch);
                self.stages[i].core.handle(now, Event::Computed(results));
                if let Some(started) = started {
                    self.stages[i].core.handle(now, Event::ComputeTime(started.elapsed()));
                }
            }
        }
    }

    /// A new stream accepted by stage `j` whose other end is `peer`.
    fn open_pipe(&mut self, j: usize, peer: End) -> StreamId {
        let stage = &mut self.stages[j];
        let stream = StreamId::Accepted(stage.next_accepted);
        stage.next_accepted += 1;
        stage.pipes.insert(stream, Pipe { peer, inbox: VecDeque::new(), peer_finished: false, wants_read: None });
        let peer = match peer {
            End::Client(c) => Peer::numbered(c as u64),
            End::Stage(..) => Peer::LOCAL,
        };
        stage.core.handle(self.now, Event::Accepted { stream, peer });
        stream
    }

    fn client_peer(&mut self, c: ClientStream) -> Option<&mut Pipe> {
        let (i, stream) = self.clients.get(c.0)?.peer?;
        self.stages[i].pipes.get_mut(&stream)
    }
}

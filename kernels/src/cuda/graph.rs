//! CUDA graphs for the decode step.
//!
//! A decode step launches a few hundred small kernels; launched one by one, the gaps between them cost more than
//! the kernels themselves on a small model. [`CudaBackend::capture_step`] runs a step (any code that drives this
//! backend through the [`Backend`](crate::Backend) trait, e.g. a shard's forward pass) while the stream is captured,
//! and keeps the result as a [`DecodeGraph`]. [`CudaBackend::replay_step`] runs the same code again in *replay*
//! mode: no kernel is launched; every op only writes its small host arguments (token ids, positions, KV slots, block
//! tables) into the graph's page-locked staging area, at the same offsets as during capture, and adds its launch
//! (kernel, grid, arguments) to a signature. If the signature equals the captured one, the step is launched as one
//! copy of the staged bytes and the graph; otherwise nothing ran and the caller runs the step eagerly or captures a
//! new graph.
//!
//! A step captured with its [`StepInputs`] (`capture_step_with`, the node's decode step) whose every staged argument
//! came from those inputs is replayed without running it: [`CudaBackend::replay_direct`] writes the arguments from
//! the next step's inputs straight into the free host half and launches the copy and the graph; no layer is walked
//! and no op is called (kernels/src/cuda/step_record.rs).
//!
//! What is captured: every kernel and device copy of the step. The staged arguments are not copied inside the
//! graph: its kernels read the graph's device staging area, which one host-to-device copy of the bytes the step
//! staged fills before each launch. The host side is double-buffered (`stage_plan::DoubleStage`), so writing the
//! next step's arguments never waits for the previous launch. Activation tensors allocated inside the step belong
//! to the graph (the same buffers on every replay), so a replayed step's outputs are valid until the next replay of
//! the same graph. Not allowed inside a step: uploads and downloads of tensors, `synchronize` and `sample` (they
//! need the host); sample after the step. The signature changes, and a new capture is needed, when the batch shape
//! changes or the attention split count (a power of two of 64-token splits of the longest context) grows.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaGraph, CudaStream, result, sys};

use super::backend::CudaBackend;
use super::stage_plan::{DoubleStage, GRAPH_STAGING_BYTES, StageOps};
use super::staging::PinnedBuf;
use super::step_record::{DirectPlan, StepRecording};
use super::storage::{RawDeviceBuf, cuda_err};
use crate::error::{KernelError, Result};
use crate::step_graph::{GraphRunner, Replay, StepInputs};

pub(crate) enum Mode {
    Eager,
    Capture(Recording),
    Replay(Recording),
}

/// A graph's staging area: two page-locked host halves (written alternately by successive steps) and the device
/// area the graph's kernels read, filled by one copy before each launch.
pub(crate) struct GraphArea {
    hosts: [PinnedBuf; 2],
    dev: RawDeviceBuf,
    /// Recorded after the copy from each half.
    copied: [CudaEvent; 2],
    stage: DoubleStage,
    /// The half this step writes.
    half: usize,
}

/// [`StageOps`] on the device: the copy from a host half and the graph launch, on the backend's stream.
struct DeviceOps<'a> {
    hosts: &'a [PinnedBuf; 2],
    dev: u64,
    copied: &'a [CudaEvent; 2],
    stream: &'a CudaStream,
    exec: Option<&'a CudaGraph>,
}

impl StageOps for DeviceOps<'_> {
    fn wait_copy(&mut self, half: usize) -> Result<()> {
        self.copied[half].synchronize().map_err(cuda_err)
    }

    fn copy(&mut self, half: usize, len: usize) -> Result<()> {
        if len > 0 {
            let src = self.hosts[half].read(0, len);
            // A raw driver call: the stream's context must be current on this thread.
            self.stream.context().bind_to_thread().map_err(cuda_err)?;
            // SAFETY: `src` is page-locked memory of this graph, not rewritten before the event recorded below has
            // completed (DoubleStage waits for it); `dev` is the device area of the same capacity (len <= capacity,
            // the plan's bound).
            unsafe { result::memcpy_htod_async(self.dev, src, self.stream.cu_stream()) }.map_err(cuda_err)?;
        }
        self.copied[half].record(self.stream).map_err(cuda_err)
    }

    fn launch(&mut self) -> Result<()> {
        let exec = self.exec.ok_or_else(|| KernelError::Cuda("no graph to launch".into()))?;
        exec.launch().map_err(cuda_err)
    }
}

impl GraphArea {
    fn new(backend: &CudaBackend) -> Result<Self> {
        let pinned = || PinnedBuf::new(&backend.ctx, GRAPH_STAGING_BYTES, true);
        let event = || backend.ctx.new_event(None).map_err(cuda_err);
        Ok(Self {
            hosts: [pinned()?, pinned()?],
            dev: RawDeviceBuf::new(&backend.ctx, GRAPH_STAGING_BYTES)?,
            copied: [event()?, event()?],
            stage: DoubleStage::new(),
            half: 0,
        })
    }

    /// Writes a staged argument at `offset` of this step's host half.
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.hosts[self.half].write(offset, bytes);
    }

    /// The device address the graph's kernels read for `offset`.
    pub(crate) fn device_addr(&self, offset: usize) -> u64 {
        self.dev.ptr() + offset as u64
    }

    /// Picks the half the next step writes (waiting only for the copy queued from it two launches ago).
    fn begin(&mut self, stream: &CudaStream) -> Result<()> {
        let mut ops = DeviceOps { hosts: &self.hosts, dev: self.dev.ptr(), copied: &self.copied, stream, exec: None };
        self.half = self.stage.begin(&mut ops)?;
        Ok(())
    }

    /// One copy of the `used` bytes this step staged, then the graph.
    fn launch(&mut self, stream: &CudaStream, exec: &CudaGraph, used: usize) -> Result<()> {
        let mut ops =
            DeviceOps { hosts: &self.hosts, dev: self.dev.ptr(), copied: &self.copied, stream, exec: Some(exec) };
        self.stage.launch(&mut ops, used)
    }
}

/// What a captured step owns and how it was launched.
pub(crate) struct Recording {
    pub(crate) area: GraphArea,
    /// Where each staged argument of the step goes (one copy per distinct argument, kernels/src/cuda/stage_plan.rs),
    /// in which role, and the launch signature (kernels/src/cuda/step_record.rs).
    pub(crate) host: StepRecording,
    pub(crate) bufs: Vec<Arc<RawDeviceBuf>>,
    next: usize,
}

impl Recording {
    fn new(backend: &CudaBackend, inputs: Option<&StepInputs<'_>>) -> Result<Self> {
        let mut host = StepRecording::new(GRAPH_STAGING_BYTES);
        host.begin(inputs);
        Ok(Self { area: GraphArea::new(backend)?, host, bufs: Vec::new(), next: 0 })
    }

    pub(crate) fn sign(&mut self, words: &[u64]) {
        self.host.sign(words);
    }

    pub(crate) fn sign_str(&mut self, s: &str) {
        self.host.sign_str(s);
    }

    /// The next graph buffer in allocation order (replay), which must have the size it had when captured.
    pub(crate) fn next_buf(&mut self, bytes: usize) -> Result<Arc<RawDeviceBuf>> {
        let buf = self.bufs.get(self.next).cloned().ok_or_else(diverged)?;
        if buf.len() != bytes {
            return Err(diverged());
        }
        self.next += 1;
        Ok(buf)
    }

    fn rewind(&mut self) {
        self.host.begin(None);
        self.next = 0;
    }
}

fn diverged() -> KernelError {
    KernelError::Cuda("the replayed step differs from the captured one; run it eagerly or capture again".into())
}

/// A captured step, replayable with [`CudaBackend::replay_step`].
pub struct DecodeGraph {
    exec: CudaGraph,
    /// `None` only while a replay is running.
    rec: Option<Recording>,
    signature: Vec<u64>,
    /// The replay from the step's inputs alone, when the capture allowed it.
    direct: Option<DirectPlan>,
    /// Recorded after each launch: the graph's buffers are freed only once its last launch finished.
    done: CudaEvent,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bufs = self.rec.as_ref().map_or(0, |r| r.bufs.len());
        let direct = if self.direct.is_some() { ", direct replay" } else { "" };
        write!(f, "DecodeGraph({bufs} buffers, {} signature words{direct})", self.signature.len())
    }
}

impl Drop for DecodeGraph {
    fn drop(&mut self) {
        // The graph's buffers are freed right after this: let its last launch finish first.
        let _ = self.done.synchronize();
    }
}

// SAFETY: the graph handles are used only through `&mut DecodeGraph` (one thread at a time), which is what CUDA
// requires of graph objects; moving them between threads is allowed.
unsafe impl Send for DecodeGraph {}

impl CudaBackend {
    /// Moves the recording out of `slot` into capture or replay mode for the calling thread; on failure the
    /// recording stays in `slot`.
    fn enter(&self, slot: &mut Option<Recording>, capture: bool) -> Result<()> {
        let mut ex = self.exec()?;
        if !matches!(ex.mode, Mode::Eager) {
            return Err(KernelError::Cuda("a CUDA graph step is already being captured or replayed".into()));
        }
        let rec = slot.take().ok_or_else(|| KernelError::Cuda("graph state lost".into()))?;
        ex.mode = if capture { Mode::Capture(rec) } else { Mode::Replay(rec) };
        ex.step_thread = Some(std::thread::current().id());
        Ok(())
    }

    fn leave(&self) -> Option<Recording> {
        let mut ex = self.exec.lock();
        ex.step_thread = None;
        match std::mem::replace(&mut ex.mode, Mode::Eager) {
            Mode::Capture(r) | Mode::Replay(r) => Some(r),
            Mode::Eager => None,
        }
    }

    /// Runs `step` once while capturing it into a CUDA graph, launches the graph (so the step's outputs are
    /// computed), and returns the outputs with the graph.
    pub fn capture_step<R, E: From<KernelError>>(
        &self,
        step: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<(R, DecodeGraph), E> {
        self.capture_step_with(None, step)
    }

    /// As [`CudaBackend::capture_step`], for a step whose per-step inputs are `inputs`: when every argument the
    /// step stages is one of them, the graph can be replayed from the next step's inputs alone
    /// ([`CudaBackend::replay_direct`]).
    pub fn capture_step_with<R, E: From<KernelError>>(
        &self,
        inputs: Option<&StepInputs<'_>>,
        step: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<(R, DecodeGraph), E> {
        self.stream.synchronize().map_err(cuda_err)?;
        self.enter(&mut Some(Recording::new(self, inputs)?), true)?;
        if let Err(e) = self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) {
            self.leave();
            return Err(cuda_err(e).into());
        }
        let out = step();
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let rec = self.leave().ok_or_else(|| KernelError::Cuda("capture state lost".into()))?;
        let out = out?;
        let exec =
            graph.map_err(cuda_err)?.ok_or_else(|| KernelError::Cuda("the captured step launched nothing".into()))?;
        let done = self.ctx.new_event(None).map_err(cuda_err)?;
        let signature = rec.host.signature().to_vec();
        let direct = rec.host.finish_capture();
        let mut graph = DecodeGraph { exec, rec: Some(rec), signature, direct, done };
        if let Some(rec) = graph.rec.as_mut() {
            let used = rec.host.plan.used();
            rec.area.launch(&self.stream, &graph.exec, used)?;
        }
        graph.done.record(&self.stream).map_err(cuda_err)?;
        Ok((out, graph))
    }

    /// Runs `step` in replay mode (nothing is launched, arguments are staged) and, if it issued exactly the launches
    /// that were captured, launches the graph. Returns the step's outputs, which live in the graph's buffers.
    pub fn replay_step<R, E: From<KernelError>>(
        &self,
        graph: &mut DecodeGraph,
        step: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        self.try_replay_step(graph, step)?.ok_or_else(|| diverged().into())
    }

    /// As [`CudaBackend::replay_step`], but a step that differs from the capture gives `Ok(None)` (nothing ran).
    pub fn try_replay_step<R, E: From<KernelError>>(
        &self,
        graph: &mut DecodeGraph,
        step: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<Option<R>, E> {
        // The other host half than the previous launch's: no wait for that launch (stage_plan::DoubleStage).
        if let Some(rec) = graph.rec.as_mut() {
            rec.rewind();
            rec.area.begin(&self.stream)?;
        }
        self.enter(&mut graph.rec, false)?;
        let out = step();
        let rec = self.leave().ok_or_else(|| KernelError::Cuda("replay state lost".into()))?;
        let same = rec.host.signature() == graph.signature && rec.next == rec.bufs.len();
        graph.rec = Some(rec);
        let out = match out {
            Ok(o) => o,
            // An op that refused to replay (a buffer of another size, a staging placement it cannot reuse) is a
            // step that differs from the capture, not a failure of the step.
            Err(_) if !same => return Ok(None),
            Err(e) => return Err(e),
        };
        if !same {
            return Ok(None);
        }
        if let Some(rec) = graph.rec.as_mut() {
            let used = rec.host.plan.used();
            rec.area.launch(&self.stream, &graph.exec, used)?;
        }
        graph.done.record(&self.stream).map_err(cuda_err)?;
        Ok(Some(out))
    }

    /// Whether `graph` can be replayed from a step's inputs alone ([`CudaBackend::replay_direct`]).
    pub fn replays_directly(graph: &DecodeGraph) -> bool {
        graph.direct.is_some()
    }

    /// Replays `graph` for the step whose per-step inputs are `inputs`, without running the step: the staged
    /// arguments are written from `inputs` into the free host half, then one staging copy and the graph are
    /// launched. `Ok(false)` when the step differs from the capture in anything its launches depend on, or the
    /// graph was not captured with inputs (nothing ran). The outputs are the captured step's tensors, rewritten.
    pub fn replay_direct(&self, graph: &mut DecodeGraph, inputs: &StepInputs<'_>) -> Result<bool> {
        // Held throughout, so no other thread's op or capture lands between the copy and the launch.
        let ex = self.exec()?;
        if !matches!(ex.mode, Mode::Eager) {
            return Err(KernelError::Cuda("a CUDA graph step is already being captured or replayed".into()));
        }
        let (Some(rec), Some(direct)) = (graph.rec.as_mut(), graph.direct.as_ref()) else {
            return Ok(false);
        };
        // The other host half than the previous launch's: no wait for that launch (stage_plan::DoubleStage).
        rec.area.begin(&self.stream)?;
        let area = &mut rec.area;
        let staged = direct.stage(inputs, &mut rec.host.plan, &mut |at, bytes| area.write(at, bytes));
        let Some(used) = staged else {
            return Ok(false);
        };
        rec.area.launch(&self.stream, &graph.exec, used)?;
        graph.done.record(&self.stream).map_err(cuda_err)?;
        drop(ex);
        Ok(true)
    }
}

/// Graphs per batch-size bucket (kernels/src/step_graph.rs) on this backend's capture and replay.
impl GraphRunner for CudaBackend {
    type Graph = DecodeGraph;

    fn capture(&self, inputs: Option<&StepInputs<'_>>, step: &mut dyn FnMut() -> Result<()>) -> Result<DecodeGraph> {
        self.capture_step_with(inputs, step).map(|((), g)| g)
    }

    fn replay(
        &self,
        graph: &mut DecodeGraph,
        inputs: Option<&StepInputs<'_>>,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Replay> {
        if let Some(inputs) = inputs
            && graph.direct.is_some()
        {
            return Ok(if self.replay_direct(graph, inputs)? { Replay::Direct } else { Replay::Missed });
        }
        Ok(if self.try_replay_step(graph, step)?.is_some() { Replay::Walked } else { Replay::Missed })
    }
}

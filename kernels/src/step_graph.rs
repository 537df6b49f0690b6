//! Which decode steps run as a CUDA graph: one graph per batch-size bucket (and layer span), captured the second
//! time a shape is seen, replayed after that, recaptured when a replay no longer matches, and given up for a while
//! when a shape keeps changing (docs/CUDA.md, "CUDA graphs per batch bucket").
//!
//! This is host-side policy only, written against [`GraphRunner`] so it is tested on the CPU with a runner that
//! records what it was asked to do; the CUDA backend implements the runner with `capture_step_with` and, for a step
//! given with its [`StepInputs`], `replay_direct` (the step is not run), else `try_replay_step` (the step runs in
//! replay mode).

use std::collections::HashMap;

use crate::backend::AttnSeq;
use crate::error::Result;

/// Batch sizes (decode rows) that get a graph; a batch runs padded to the smallest bucket that holds it.
pub const BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The bucket a batch of `rows` decode rows runs in; `None` for an empty batch or one above the largest bucket.
pub fn bucket(rows: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| rows > 0 && b >= rows)
}

/// What a graph replays: whose step (one caller's id, e.g. a shard's, so two shards on one device never share a
/// graph), the padded batch size and the layer span. Every other shape of the step follows from these; what does
/// not (context length, the batch's block tables) is checked by the replay's signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    pub owner: u64,
    pub bucket: usize,
    pub span: (usize, usize),
}

/// How one step ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepRun {
    /// Launched op by op (no key, first sight of a key, a key in back-off, or a backend without graphs).
    Eager,
    /// Captured into a new graph (and run).
    Captured,
    /// The key's graph was replayed by running the step in replay mode (every op staged its arguments and signed
    /// its launch): the host walked every layer.
    Replayed,
    /// The key's graph was replayed from the step's [`StepInputs`] alone: its staged arguments were written from
    /// them and the step was not run (no backend op was called).
    ReplayedDirect,
    /// The replay did not match the captured step (e.g. a longer context needs more attention splits, or a batch's
    /// block tables changed length), so the step was captured again.
    Recaptured,
}

/// A decode step's per-step inputs: everything the arguments a graph backend stages for the step are derived from
/// (docs/CUDA.md, "CUDA graphs per batch bucket"). The step must hand the backend's ops exactly these: `ids` to the
/// embedding, `positions` to RoPE, `slots` to the KV store and `seqs` to attention, in every layer. A capture checks
/// that every argument the step staged is one of these (in the backend's encoding); a replay then writes the staged
/// bytes from them directly, without running the step.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    /// Token ids of the embedding, one per row (a first stage); `None` for a step fed hidden states.
    pub ids: Option<&'a [u32]>,
    /// Position of each row.
    pub positions: &'a [u32],
    /// KV-cache slot of each row.
    pub slots: &'a [u32],
    /// The attention's sequences (rows, first position, block table).
    pub seqs: &'a [AttnSeq<'a>],
    /// Whatever else the step's launches depend on that its [`GraphKey`] does not fix (the caller's word, e.g.
    /// which rows go through the LM head): a direct replay needs the tag of the capture.
    pub tag: u64,
}

/// How a replay went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// The step differs from the capture: nothing ran (the caller runs it eagerly or captures again).
    Missed,
    /// The step ran in replay mode (every op staged and signed) and the graph was launched.
    Walked,
    /// The staged arguments were written from the step's inputs and the graph was launched; the step did not run.
    Direct,
}

/// A backend that can capture a step into a graph and replay it. `step` runs the step's ops through the backend; it
/// may be called twice for one step (a replay that did not match, then a capture), so it must reset any host
/// state it changes before it runs. `inputs`, where given, are the step's [`StepInputs`]: a graph captured with them
/// is replayed from them without running `step`.
pub trait GraphRunner {
    type Graph;
    /// Runs `step` while capturing it and returns the graph; the step's work has run when this returns.
    fn capture(&self, inputs: Option<&StepInputs<'_>>, step: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Replays the graph for this step: directly from `inputs` where the graph allows it, else by running `step` in
    /// replay mode. [`Replay::Missed`] when the step differs from the capture (nothing ran).
    fn replay(
        &self,
        graph: &mut Self::Graph,
        inputs: Option<&StepInputs<'_>>,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Replay>;
}

/// Replays that did not match, in a row, before a key runs eagerly for [`BACKOFF_STEPS`] steps.
pub const MAX_MISSES: u32 = 3;
/// Eager steps of a key after [`MAX_MISSES`] recaptures in a row.
pub const BACKOFF_STEPS: u32 = 64;
/// Graphs kept at most (each owns its activation buffers and a staging area: 1 MiB on the device, 2 x 1 MiB
/// page-locked); the least recently used goes.
pub const MAX_GRAPHS: usize = 16;

struct Entry<G> {
    graph: Option<G>,
    seen: u64,
    misses: u32,
    eager_left: u32,
    /// The capture failed (an op that cannot be captured): this key always runs eagerly.
    never: bool,
    used: u64,
}

/// The graphs of one backend, by key, and the policy that decides how each step runs.
pub struct StepGraphs<G> {
    entries: HashMap<GraphKey, Entry<G>>,
    clock: u64,
}

impl<G> Default for StepGraphs<G> {
    fn default() -> Self {
        Self { entries: HashMap::new(), clock: 0 }
    }
}

impl<G> StepGraphs<G> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Graphs held now.
    pub fn graphs(&self) -> usize {
        self.entries.values().filter(|e| e.graph.is_some()).count()
    }

    /// Drops every graph (e.g. when the KV pool or the weights change); keys start again from their first sight.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Runs one step: eagerly without a key, else as the key's policy says (see the module).
    pub fn run<R: GraphRunner<Graph = G>>(
        &mut self,
        runner: &R,
        key: Option<GraphKey>,
        inputs: Option<&StepInputs<'_>>,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<StepRun> {
        let Some(key) = key else {
            step()?;
            return Ok(StepRun::Eager);
        };
        self.clock += 1;
        let clock = self.clock;
        let e = self.entries.entry(key).or_insert(Entry {
            graph: None,
            seen: 0,
            misses: 0,
            eager_left: 0,
            never: false,
            used: clock,
        });
        e.seen += 1;
        e.used = clock;
        if e.never || e.seen == 1 || e.eager_left > 0 {
            e.eager_left = e.eager_left.saturating_sub(1);
            step()?;
            return Ok(StepRun::Eager);
        }
        if let Some(g) = e.graph.as_mut() {
            match runner.replay(g, inputs, step)? {
                Replay::Walked => {
                    e.misses = 0;
                    return Ok(StepRun::Replayed);
                }
                Replay::Direct => {
                    e.misses = 0;
                    return Ok(StepRun::ReplayedDirect);
                }
                Replay::Missed => {}
            }
            e.misses += 1;
            e.graph = None;
            if e.misses >= MAX_MISSES {
                // The shape keeps changing: run eagerly for a while (this step included) instead of capturing.
                e.misses = 0;
                e.eager_left = BACKOFF_STEPS - 1;
                step()?;
                return Ok(StepRun::Eager);
            }
        }
        let recapture = e.misses > 0;
        self.evict_for_one_more(key);
        let graph = match runner.capture(inputs, step) {
            Ok(g) => g,
            Err(_) => {
                // Nothing ran. If the step succeeds eagerly, something in it cannot be captured: this key runs
                // eagerly from now on. If it fails eagerly too, the failure is the step's own (a bad batch), not
                // the capture's, and the key keeps its graphs.
                let eager = step();
                if eager.is_ok()
                    && let Some(e) = self.entries.get_mut(&key)
                {
                    e.never = true;
                }
                eager?;
                return Ok(StepRun::Eager);
            }
        };
        if let Some(e) = self.entries.get_mut(&key) {
            e.graph = Some(graph);
        }
        Ok(if recapture { StepRun::Recaptured } else { StepRun::Captured })
    }

    /// Makes room for one more graph besides `keep`'s: drops the least recently used others beyond the limit.
    fn evict_for_one_more(&mut self, keep: GraphKey) {
        while self.graphs() >= MAX_GRAPHS {
            let oldest = self
                .entries
                .iter()
                .filter(|(k, e)| **k != keep && e.graph.is_some())
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| *k);
            match oldest.and_then(|k| self.entries.get_mut(&k)) {
                Some(e) => e.graph = None,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::error::KernelError;

    /// A runner that records what it was asked to do. A "graph" is the signature the step produced when it was
    /// captured; a replay matches when the step produces the same one (as the CUDA backend compares launches).
    #[derive(Default)]
    struct Recorder {
        log: RefCell<Vec<&'static str>>,
        signature: RefCell<u64>,
        capture_fails: bool,
    }

    impl GraphRunner for Recorder {
        type Graph = u64;
        fn capture(&self, _: Option<&StepInputs<'_>>, step: &mut dyn FnMut() -> Result<()>) -> Result<u64> {
            if self.capture_fails {
                return Err(KernelError::Cuda("not capturable".into()));
            }
            step()?;
            self.log.borrow_mut().push("capture");
            Ok(*self.signature.borrow())
        }
        fn replay(
            &self,
            g: &mut u64,
            inputs: Option<&StepInputs<'_>>,
            step: &mut dyn FnMut() -> Result<()>,
        ) -> Result<Replay> {
            // A graph backend replays from the inputs without running the step where it can.
            let direct = inputs.is_some();
            if !direct {
                step()?;
            }
            let same = *g == *self.signature.borrow();
            self.log.borrow_mut().push(match (same, direct) {
                (false, _) => "diverged",
                (true, false) => "replay",
                (true, true) => "direct",
            });
            Ok(match (same, direct) {
                (false, _) => Replay::Missed,
                (true, false) => Replay::Walked,
                (true, true) => Replay::Direct,
            })
        }
    }

    fn key(bucket: usize) -> Option<GraphKey> {
        Some(GraphKey { owner: 1, bucket, span: (0, 30) })
    }

    #[test]
    fn buckets_are_the_smallest_that_hold_the_batch() {
        let got: Vec<_> = [0, 1, 2, 3, 4, 5, 8, 9, 17, 33, 64, 65].iter().map(|&n| bucket(n)).collect();
        let want = [None, Some(1), Some(2), Some(4), Some(4), Some(8), Some(8), Some(16), Some(32), Some(64)];
        assert_eq!(&got[..10], &want);
        assert_eq!(&got[10..], &[Some(64), None]);
    }

    #[test]
    fn eager_first_then_capture_then_replay_per_bucket() {
        let r = Recorder::default();
        let mut g = StepGraphs::new();
        let mut runs = 0;
        let mut step = || -> Result<()> {
            runs += 1;
            Ok(())
        };
        let got: Vec<StepRun> = [key(4), key(4), key(4), key(8), key(8), key(4), None]
            .into_iter()
            .map(|k| g.run(&r, k, None, &mut step).expect("step"))
            .collect();
        use StepRun::*;
        assert_eq!(got, [Eager, Captured, Replayed, Eager, Captured, Replayed, Eager]);
        // Every step ran its body exactly once (a replay runs it in replay mode, the recorder counts it too).
        assert_eq!(runs, 7);
        assert_eq!(*r.log.borrow(), ["capture", "replay", "capture", "replay"]);
        assert_eq!(g.graphs(), 2);
    }

    #[test]
    fn with_step_inputs_a_replay_does_not_run_the_step_and_a_miss_captures_again() {
        let r = Recorder::default();
        let mut g = StepGraphs::new();
        let mut runs = 0;
        let mut step = || -> Result<()> {
            runs += 1;
            Ok(())
        };
        let inputs = StepInputs { ids: None, positions: &[3], slots: &[3], seqs: &[], tag: 0 };
        use StepRun::*;
        let mut got = Vec::new();
        for s in 0..5 {
            if s == 3 {
                *r.signature.borrow_mut() = 7;
            }
            got.push(g.run(&r, key(1), Some(&inputs), &mut step).expect("step"));
        }
        assert_eq!(got, [Eager, Captured, ReplayedDirect, Recaptured, ReplayedDirect]);
        // Only the eager step and the two captures ran the step.
        assert_eq!(runs, 3);
        assert_eq!(*r.log.borrow(), ["capture", "direct", "diverged", "capture", "direct"]);
    }

    #[test]
    fn a_changed_step_is_recaptured_and_a_key_that_keeps_changing_backs_off() {
        let r = Recorder::default();
        let mut g = StepGraphs::new();
        let mut step = || -> Result<()> { Ok(()) };
        use StepRun::*;
        assert_eq!(g.run(&r, key(2), None, &mut step).expect("1"), Eager);
        assert_eq!(g.run(&r, key(2), None, &mut step).expect("2"), Captured);
        // A block table grew / the context needs more attention splits: the signature changes once.
        *r.signature.borrow_mut() = 1;
        assert_eq!(g.run(&r, key(2), None, &mut step).expect("3"), Recaptured);
        assert_eq!(g.run(&r, key(2), None, &mut step).expect("4"), Replayed);
        // Now it changes every step: two more recaptures, then eager for BACKOFF_STEPS steps, then capture again.
        let mut got = Vec::new();
        for s in 0..(3 + BACKOFF_STEPS as u64) {
            *r.signature.borrow_mut() = 100 + s;
            got.push(g.run(&r, key(2), None, &mut step).expect("step"));
        }
        assert_eq!(&got[..2], &[Recaptured, Recaptured]);
        assert!(got[2..2 + BACKOFF_STEPS as usize].iter().all(|&s| s == Eager), "{got:?}");
        assert_eq!(got[2 + BACKOFF_STEPS as usize], Captured);
    }

    #[test]
    fn a_step_that_cannot_be_captured_runs_eagerly_for_good() {
        let r = Recorder { capture_fails: true, ..Recorder::default() };
        let mut g = StepGraphs::new();
        let mut runs = 0;
        let mut step = || -> Result<()> {
            runs += 1;
            Ok(())
        };
        let got: Vec<StepRun> = (0..5).map(|_| g.run(&r, key(1), None, &mut step).expect("step")).collect();
        assert!(got.iter().all(|&s| s == StepRun::Eager));
        assert_eq!(runs, 5);
        assert_eq!(g.graphs(), 0);
    }

    #[test]
    fn errors_of_the_step_are_returned_and_do_not_turn_graphs_off() {
        let r = Recorder::default();
        let mut g = StepGraphs::new();
        let mut fail = || -> Result<()> { Err(KernelError::Cuda("boom".into())) };
        let mut ok = || -> Result<()> { Ok(()) };
        assert!(g.run(&r, key(1), None, &mut fail).is_err());
        assert!(g.run(&r, None, None, &mut fail).is_err());
        // A failing step where a capture would come (a bad batch): the error comes back, the key still captures.
        assert!(g.run(&r, key(1), None, &mut fail).is_err());
        assert_eq!(g.run(&r, key(1), None, &mut ok).expect("good step"), StepRun::Captured);
        // A failing step where a replay would come: the error comes back and the graph stays.
        assert!(g.run(&r, key(1), None, &mut fail).is_err());
        assert_eq!(g.run(&r, key(1), None, &mut ok).expect("good step"), StepRun::Replayed);
    }

    #[test]
    fn at_most_max_graphs_are_kept_least_recently_used_first_out() {
        let r = Recorder::default();
        let mut g = StepGraphs::new();
        let mut step = || -> Result<()> { Ok(()) };
        let keys: Vec<_> =
            (0..MAX_GRAPHS + 2).map(|i| Some(GraphKey { owner: 1, bucket: 1, span: (i, i + 1) })).collect();
        for k in &keys {
            g.run(&r, *k, None, &mut step).expect("eager");
            g.run(&r, *k, None, &mut step).expect("capture");
        }
        assert_eq!(g.graphs(), MAX_GRAPHS);
        // The two oldest were evicted: their next step captures again, the newest replays.
        assert_eq!(g.run(&r, keys[0], None, &mut step).expect("old"), StepRun::Captured);
        assert_eq!(g.run(&r, keys[MAX_GRAPHS + 1], None, &mut step).expect("new"), StepRun::Replayed);
    }
}

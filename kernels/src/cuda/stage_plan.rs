//! Where the staged arguments of a captured decode step go in its graph's staging area (kernels/src/cuda/graph.rs).
//!
//! Every layer of a step stages the same block tables, row infos and positions again; staged one after the other, an
//! 80-layer shard whose sessions reserve 64k tokens each needs more than the area holds and cannot be captured. The
//! plan therefore stages each distinct byte string once per step: a region whose bytes equal those of a region
//! already staged in this step gets that region's device address (no new copy node in the graph). Replay walks the
//! same plan, so it reuses exactly where the capture did; the placement (offset, new or reused) is part of the step's
//! signature, so a replay whose contents coincide differently falls back to eager execution instead of reading the
//! wrong bytes. Staged arguments are only ever read by kernels, which is what makes sharing a region safe.
//!
//! Pure host logic (no driver call), so its tests run without a GPU.

// Used by the CUDA backend only; built without it for the tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::error::{KernelError, Result};

/// Alignment of every staged region in bytes (enough for 16-byte vector loads).
pub(crate) const ALIGN: usize = 16;

/// Bytes of staged arguments one captured step may use (page-locked host memory plus its device mirror, per graph).
/// With one copy per distinct argument, an 80-layer step of 8 sessions that reserve 64k tokens each (16-token
/// blocks) stages about 128 KiB (test `an_80_layer_step_with_64k_token_sessions_fits`).
pub(crate) const GRAPH_STAGING_BYTES: usize = 1 << 20;

/// Where one staged argument went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Written at this byte offset and copied to the device by its own copy node.
    New(usize),
    /// Identical to the region already staged at this offset in the same step; nothing is written or copied.
    Reused(usize),
}

impl Placement {
    pub(crate) fn offset(self) -> usize {
        match self {
            Placement::New(at) | Placement::Reused(at) => at,
        }
    }

    /// Words for the step's signature: kind, offset and length.
    pub(crate) fn signature(self, len: usize) -> [u64; 3] {
        match self {
            Placement::New(at) => [1, at as u64, len as u64],
            Placement::Reused(at) => [2, at as u64, len as u64],
        }
    }
}

struct Region {
    hash: u64,
    offset: usize,
    len: usize,
}

/// The placement of one step's staged arguments; rewound before each replay.
pub(crate) struct StagePlan {
    capacity: usize,
    head: usize,
    regions: Vec<Region>,
    /// The bytes staged so far in this step, at their offsets (to compare a candidate for reuse exactly).
    shadow: Vec<u8>,
}

/// FNV-1a over 8-byte words, then the tail bytes: a cheap fingerprint (a hit is confirmed byte for byte), a word
/// at a time since block tables run to kilobytes and a direct replay hashes each distinct argument once per step.
fn fnv1a(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x100_0000_01b3;
    let mut words = bytes.chunks_exact(8);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in &mut words {
        h = (h ^ u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])).wrapping_mul(PRIME);
    }
    words.remainder().iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(PRIME))
}

impl StagePlan {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity, head: 0, regions: Vec::new(), shadow: Vec::new() }
    }

    /// Starts a new step (before each replay): every region becomes free again.
    pub(crate) fn rewind(&mut self) {
        self.head = 0;
        self.regions.clear();
        self.shadow.clear();
    }

    /// Bytes of the area this step uses so far (aligned): what one copy must move before the graph runs.
    pub(crate) fn used(&self) -> usize {
        self.head
    }

    /// Places `bytes`: reuses an identical region of this step, else takes the next aligned region. Fails when the
    /// step would need more than the capacity.
    pub(crate) fn place(&mut self, bytes: &[u8]) -> Result<Placement> {
        let hash = fnv1a(bytes);
        if !bytes.is_empty()
            && let Some(r) = self
                .regions
                .iter()
                .find(|r| r.hash == hash && r.len == bytes.len() && self.shadow[r.offset..r.offset + r.len] == *bytes)
        {
            return Ok(Placement::Reused(r.offset));
        }
        let at = self.head;
        let end = at.checked_add(bytes.len()).filter(|&e| e <= self.capacity).ok_or_else(|| {
            KernelError::Cuda(format!(
                "the captured step stages more than its {} bytes of kernel arguments ({} used, {} more asked)",
                self.capacity,
                at,
                bytes.len()
            ))
        })?;
        self.shadow.resize(at, 0);
        self.shadow.extend_from_slice(bytes);
        self.head = end.next_multiple_of(ALIGN).min(self.capacity.max(end));
        if !bytes.is_empty() {
            self.regions.push(Region { hash, offset: at, len: bytes.len() });
        }
        Ok(Placement::New(at))
    }
}

/// What launching a captured step does on the device, in stream order (implemented by the CUDA backend's graph,
/// and by a recorder in the tests).
pub(crate) trait StageOps {
    /// Waits until the copy last queued from host half `half` has read it.
    fn wait_copy(&mut self, half: usize) -> Result<()>;
    /// Queues one copy of the first `len` bytes of host half `half` into the graph's device area (in stream order
    /// after the previous launch of the graph, which read that area) and marks the copy's completion.
    fn copy(&mut self, half: usize, len: usize) -> Result<()>;
    /// Launches the graph.
    fn launch(&mut self) -> Result<()>;
}

/// The double-buffered host side of a graph's staging area. A step writes its arguments into one page-locked half;
/// its launch is one copy of the bytes used from that half into the graph's device area followed by the graph,
/// whose kernels read only the device area (the graph holds no copy node). The next step writes the other half, so
/// the host never waits for the previous launch: it waits only, before rewriting a half, for the copy queued from it
/// two launches earlier, which ran before that launch's graph.
pub(crate) struct DoubleStage {
    cur: usize,
    pending: [bool; 2],
}

impl DoubleStage {
    pub(crate) fn new() -> Self {
        Self { cur: 0, pending: [false; 2] }
    }

    /// The half the next step writes, once no queued copy reads it any more.
    pub(crate) fn begin(&mut self, ops: &mut dyn StageOps) -> Result<usize> {
        let h = self.cur;
        if self.pending[h] {
            ops.wait_copy(h)?;
            self.pending[h] = false;
        }
        Ok(h)
    }

    /// Launches the step written into the current half: one copy of its `used` bytes, then the graph; the next
    /// step writes the other half. (A replay that did not match calls nothing: its half is simply rewritten.)
    pub(crate) fn launch(&mut self, ops: &mut dyn StageOps, used: usize) -> Result<()> {
        let h = self.cur;
        ops.copy(h, used)?;
        self.pending[h] = true;
        ops.launch()?;
        self.cur ^= 1;
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// What one decode step of `layers` layers stages, in the order the CUDA backend's ops stage it
    /// (kernels/src/cuda/ops.rs): token ids once (embedding), then per layer the positions (rope of q, rope of k),
    /// the KV slots (kv_store), and the attention's row infos and concatenated block tables.
    fn decode_step(
        layers: usize,
        sessions: usize,
        reserved_tokens: usize,
        block_tokens: usize,
        step: u32,
    ) -> Vec<Vec<u32>> {
        let blocks = reserved_tokens.div_ceil(block_tokens);
        let ids: Vec<u32> = (0..sessions as u32).map(|s| 1000 + s * 7 + step).collect();
        let positions: Vec<u32> = (0..sessions as u32).map(|s| 500 + s + step).collect();
        let slots: Vec<u32> =
            positions.iter().enumerate().map(|(s, &p)| (s * blocks * block_tokens) as u32 + p).collect();
        let tables: Vec<u32> = (0..(sessions * blocks) as u32).collect();
        let row_info: Vec<u32> =
            positions.iter().enumerate().flat_map(|(s, &p)| [p + 1, (s * blocks) as u32]).collect();
        let mut out = vec![ids];
        for _ in 0..layers {
            out.extend([positions.clone(), positions.clone(), slots.clone(), row_info.clone(), tables.clone()]);
        }
        out
    }

    fn bytes(v: &[u32]) -> &[u8] {
        bytemuck::cast_slice(v)
    }

    fn aligned(n: usize) -> usize {
        n.next_multiple_of(ALIGN)
    }

    fn run(plan: &mut StagePlan, step: &[Vec<u32>]) -> Result<Vec<Placement>> {
        step.iter().map(|a| plan.place(bytes(a))).collect()
    }

    #[test]
    fn an_80_layer_step_with_64k_token_sessions_fits() {
        let (layers, sessions, reserved, block) = (80, 8, 65_536, 16);
        let step = decode_step(layers, sessions, reserved, block, 0);
        // Staged one after the other (as before the plan), the step does not fit.
        let naive: usize = step.iter().map(|a| aligned(a.len() * 4)).sum();
        assert!(naive > GRAPH_STAGING_BYTES, "{naive} bytes");
        let mut plan = StagePlan::new(GRAPH_STAGING_BYTES);
        let placed = run(&mut plan, &step).expect("the step fits");
        // Distinct arguments: ids, positions, slots, row infos, tables, each once (ids and positions differ here).
        let tables = sessions * reserved / block * 4;
        let want = aligned(sessions * 4) * 3 + aligned(sessions * 8) + aligned(tables);
        assert_eq!(plan.used(), want);
        assert!(plan.used() < 140 * 1024, "{} bytes", plan.used());
        assert_eq!(placed.iter().filter(|p| matches!(p, Placement::New(_))).count(), 5);
    }

    #[test]
    fn replay_of_the_next_step_places_every_argument_where_the_capture_did() {
        let mut plan = StagePlan::new(GRAPH_STAGING_BYTES);
        let captured = run(&mut plan, &decode_step(32, 4, 4096, 16, 0)).expect("capture");
        for step in 1..4 {
            plan.rewind();
            let replayed = run(&mut plan, &decode_step(32, 4, 4096, 16, step)).expect("replay");
            assert_eq!(replayed, captured, "step {step}");
        }
    }

    #[test]
    fn reuse_needs_equal_bytes_and_a_changed_coincidence_changes_the_placement() {
        let mut plan = StagePlan::new(1024);
        let (a, b) = ([1u32, 2, 3], [1u32, 2, 4]);
        assert_eq!(plan.place(bytes(&a)).expect("a"), Placement::New(0));
        assert_eq!(plan.place(bytes(&b)).expect("b"), Placement::New(16));
        assert_eq!(plan.place(bytes(&a)).expect("a again"), Placement::Reused(0));
        // Same bytes, other length: not the same argument.
        assert_eq!(plan.place(bytes(&a[..2])).expect("prefix"), Placement::New(32));
        let captured: Vec<[u64; 3]> =
            [Placement::New(0), Placement::New(16), Placement::Reused(0)].iter().map(|p| p.signature(12)).collect();
        // A replay in which the third argument no longer equals the first is placed (and signed) differently, so
        // the graph, which would read the first argument's bytes, is not launched.
        plan.rewind();
        let replayed: Vec<[u64; 3]> =
            [&a, &b, &[9u32, 9, 9]].iter().map(|v| plan.place(bytes(&v[..])).expect("replay").signature(12)).collect();
        assert_ne!(replayed, captured);
        assert_eq!(replayed[..2], captured[..2]);
    }

    /// A device operation as the staging area issues it (shared with step_record.rs's tests).
    #[derive(Debug, PartialEq, Eq)]
    pub(in crate::cuda) enum Op {
        Wait(usize),
        Copy(usize, usize),
        Launch,
    }

    /// Records the device operations instead of issuing them.
    #[derive(Default)]
    pub(in crate::cuda) struct Recorder(pub(in crate::cuda) Vec<Op>);

    impl StageOps for Recorder {
        fn wait_copy(&mut self, half: usize) -> Result<()> {
            self.0.push(Op::Wait(half));
            Ok(())
        }
        fn copy(&mut self, half: usize, len: usize) -> Result<()> {
            self.0.push(Op::Copy(half, len));
            Ok(())
        }
        fn launch(&mut self) -> Result<()> {
            self.0.push(Op::Launch);
            Ok(())
        }
    }

    /// One step as graph.rs runs it: take a half, place (and write) the step's arguments, and launch if it matched.
    fn step(
        stage: &mut DoubleStage,
        plan: &mut StagePlan,
        ops: &mut Recorder,
        args: &[Vec<u32>],
        matched: bool,
    ) -> usize {
        let half = stage.begin(ops).expect("begin");
        plan.rewind();
        run(plan, args).expect("fits");
        if matched {
            stage.launch(ops, plan.used()).expect("launch");
        }
        half
    }

    #[test]
    fn a_replay_is_one_staging_copy_and_the_graph_launch_and_never_waits_for_the_previous_launch() {
        let (mut stage, mut plan, mut ops) =
            (DoubleStage::new(), StagePlan::new(GRAPH_STAGING_BYTES), Recorder::default());
        // The capture's launch, then replays of the following steps of a 32-layer, 4-session batch.
        let mut halves = Vec::new();
        for s in 0..6 {
            ops.0.clear();
            halves.push(step(&mut stage, &mut plan, &mut ops, &decode_step(32, 4, 4096, 16, s), true));
            let used = plan.used();
            assert!(used > 0 && used < 40 * 1024, "{used} bytes");
            let want = if s < 2 {
                vec![Op::Copy(halves[s as usize], used), Op::Launch]
            } else {
                // Only the copy from this half two launches ago is waited for (it ran before that launch's graph).
                vec![Op::Wait(halves[s as usize]), Op::Copy(halves[s as usize], used), Op::Launch]
            };
            assert_eq!(ops.0, want, "step {s}");
        }
        // The halves alternate, so the host writes step n + 1 while step n's copy may still be queued.
        assert_eq!(halves, [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn a_replay_that_does_not_match_launches_nothing_and_its_half_is_rewritten() {
        let (mut stage, mut plan, mut ops) =
            (DoubleStage::new(), StagePlan::new(GRAPH_STAGING_BYTES), Recorder::default());
        assert_eq!(step(&mut stage, &mut plan, &mut ops, &decode_step(2, 2, 256, 16, 0), true), 0);
        ops.0.clear();
        // Not launched: no copy, no launch, and the next step writes the same half again.
        assert_eq!(step(&mut stage, &mut plan, &mut ops, &decode_step(2, 3, 256, 16, 1), false), 1);
        assert!(ops.0.is_empty(), "{:?}", ops.0);
        assert_eq!(step(&mut stage, &mut plan, &mut ops, &decode_step(2, 2, 256, 16, 1), true), 1);
        assert_eq!(ops.0, [Op::Copy(1, plan.used()), Op::Launch]);
    }

    #[test]
    fn a_full_area_is_a_clear_error() {
        let mut plan = StagePlan::new(64);
        plan.place(&[7u8; 60]).expect("fits");
        let e = plan.place(&[8u8; 8]).expect_err("full");
        assert!(e.to_string().contains("more than its 64 bytes"), "{e}");
        // Identical bytes still fit: they are reused.
        assert_eq!(plan.place(&[7u8; 60]).expect("reused"), Placement::Reused(0));
    }
}

//! The host half of a captured decode step (kernels/src/cuda/graph.rs): what each op staged and signed, and the
//! direct replay that writes a step's staged arguments from its [`StepInputs`] without running the step.
//!
//! During a capture every op stages its small arguments through [`StepRecording::stage`] with the *role* of the
//! argument (token ids, positions, KV slots, attention row infos, block tables). When the step was captured with its
//! inputs, each staged argument is compared with that role's encoding of the inputs; if every one matched (and the
//! ops' other input-dependent facts did: the attention split count, the bounds they checked), the capture yields a
//! [`DirectPlan`]: the first staging of each role with its placement, the split count, the rows of each sequence and
//! the bounds. A replay then needs neither the step nor its layers: [`DirectPlan::stage`] encodes the new inputs
//! (ids, positions and slots as they are; row infos and concatenated block tables built once), checks the bounds,
//! places the (at most five) distinct arguments in a fresh [`StagePlan`] and compares the placements with the
//! capture's. Every later staging of a role in the walked step is a reuse of its first region (its bytes are the
//! same), so equal first placements mean the walked replay would place, write and sign exactly as the capture did;
//! the split count fixes the attention launches and their workspace; everything else a launch signs is a shape or a
//! buffer fixed by the graph's key and the caller's tag. On a match the distinct arguments are written into the free
//! host half and the caller launches one staging copy and the graph.
//!
//! Pure host logic (no driver call), so its tests run without a GPU.

// Used by the CUDA backend only; built without it for the tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use super::stage_plan::{Placement, StagePlan};
use crate::backend::AttnSeq;
use crate::error::Result;
use crate::step_graph::StepInputs;

/// Keys per flash-decoding split (`ATT_SPLIT` in attention.cu).
pub(crate) const ATTN_SPLIT: usize = 64;

/// Which of the step's inputs a staged argument is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The embedding's token ids.
    Ids,
    /// RoPE's positions.
    Positions,
    /// The KV store's slots.
    Slots,
    /// Decode attention's row infos (visible keys, block-table offset per row).
    RowInfo,
    /// Decode attention's concatenated block tables.
    Tables,
    /// Anything else (prefill attention's arguments): a step staging one is replayed by walking it.
    Other,
}

/// The staged arguments of decode attention (`attention_decode` in ops.rs) and its split count.
pub(crate) struct DecodeAttnArgs {
    /// Per query row: visible keys and the offset of its sequence's block table; rows of no sequence see none.
    pub(crate) row_info: Vec<u32>,
    /// The sequences' block tables, concatenated in order.
    pub(crate) tables: Vec<u32>,
    /// Flash-decoding splits: a power of two of [`ATTN_SPLIT`]-key splits of the longest context.
    pub(crate) n_splits: usize,
}

/// Decode attention's arguments for `rows` query rows; every sequence's rows must lie inside `0..rows`.
pub(crate) fn decode_attention_args(rows: usize, seqs: &[AttnSeq<'_>]) -> DecodeAttnArgs {
    let mut row_info = vec![0u32; rows * 2];
    let mut tables = Vec::new();
    let mut max_ctx = 1;
    for s in seqs.iter().filter(|s| !s.rows.is_empty()) {
        let off = tables.len() as u32;
        tables.extend_from_slice(s.block_table);
        for (i, r) in s.rows.clone().enumerate() {
            let n_ctx = s.pos0 + i + 1;
            row_info[2 * r] = n_ctx as u32;
            row_info[2 * r + 1] = off;
            max_ctx = max_ctx.max(n_ctx);
        }
    }
    DecodeAttnArgs { row_info, tables, n_splits: max_ctx.div_ceil(ATTN_SPLIT).next_power_of_two() }
}

/// A step's inputs in the encodings the ops stage.
struct Encoded<'a> {
    ids: Option<&'a [u32]>,
    positions: &'a [u32],
    slots: &'a [u32],
    attn: DecodeAttnArgs,
}

impl<'a> Encoded<'a> {
    /// `None` when a sequence's rows lie outside the step's rows (no op would accept it).
    fn new(inputs: &StepInputs<'a>) -> Option<Self> {
        let rows = inputs.positions.len();
        if inputs.seqs.iter().any(|s| s.rows.start > s.rows.end || s.rows.end > rows) {
            return None;
        }
        Some(Self {
            ids: inputs.ids,
            positions: inputs.positions,
            slots: inputs.slots,
            attn: decode_attention_args(rows, inputs.seqs),
        })
    }

    fn bytes(&self, role: Role) -> Option<&[u8]> {
        let words: &[u32] = match role {
            Role::Ids => self.ids?,
            Role::Positions => self.positions,
            Role::Slots => self.slots,
            Role::RowInfo => &self.attn.row_info,
            Role::Tables => &self.attn.tables,
            Role::Other => return None,
        };
        Some(bytemuck::cast_slice(words))
    }
}

/// The capture's inputs, encoded (owned), to check where each staged argument came from.
struct Expected {
    bytes: Vec<(Role, Vec<u8>)>,
    n_splits: usize,
    seq_rows: Vec<(usize, usize)>,
    rows: usize,
    has_ids: bool,
    tag: u64,
}

impl Expected {
    fn new(inputs: &StepInputs<'_>) -> Option<Self> {
        let enc = Encoded::new(inputs)?;
        let roles = [Role::Ids, Role::Positions, Role::Slots, Role::RowInfo, Role::Tables];
        Some(Self {
            bytes: roles.iter().filter_map(|&r| Some((r, enc.bytes(r)?.to_vec()))).collect(),
            n_splits: enc.attn.n_splits,
            seq_rows: seq_rows(inputs.seqs),
            rows: inputs.positions.len(),
            has_ids: inputs.ids.is_some(),
            tag: inputs.tag,
        })
    }

    fn bytes(&self, role: Role) -> Option<&[u8]> {
        self.bytes.iter().find(|(r, _)| *r == role).map(|(_, b)| b.as_slice())
    }
}

fn seq_rows(seqs: &[AttnSeq<'_>]) -> Vec<(usize, usize)> {
    seqs.iter().map(|s| (s.rows.start, s.rows.len())).collect()
}

/// What the ops checked their arguments against during the capture (the tightest bound each saw), so a direct
/// replay refuses the same inputs the ops would.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bounds {
    /// Rows of the embedding table: every id must be below.
    vocab: Option<usize>,
    /// Rows of the KV caches: every slot must be below.
    slots: Option<usize>,
    /// Decode attention: cache rows and tokens per block (every block a sequence reads must exist).
    attn: Option<(usize, usize)>,
    /// Decode attention's split count (the same in every layer).
    n_splits: Option<usize>,
}

/// One staged argument of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Staged {
    pub(crate) role: Role,
    pub(crate) placed: Placement,
    pub(crate) len: usize,
}

/// The host side of one captured, replayed or directly replayed step: the staging plan, the launch signature, and
/// what was staged in which role.
pub(crate) struct StepRecording {
    pub(crate) plan: StagePlan,
    signature: Vec<u64>,
    staged: Vec<Staged>,
    expect: Option<Expected>,
    /// Whether every staged argument and fact so far came from the capture's inputs.
    traced: bool,
    bounds: Bounds,
}

impl StepRecording {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            plan: StagePlan::new(capacity),
            signature: Vec::new(),
            staged: Vec::new(),
            expect: None,
            traced: false,
            bounds: Bounds::default(),
        }
    }

    /// Starts a step: a capture with the step's inputs (`Some`) or without, or a walked replay (`None`).
    pub(crate) fn begin(&mut self, inputs: Option<&StepInputs<'_>>) {
        self.plan.rewind();
        self.signature.clear();
        self.staged.clear();
        self.bounds = Bounds::default();
        self.expect = inputs.and_then(Expected::new);
        self.traced = self.expect.is_some();
    }

    pub(crate) fn signature(&self) -> &[u64] {
        &self.signature
    }

    /// The step's staged arguments so far, in order.
    #[cfg(test)]
    pub(crate) fn staged(&self) -> &[Staged] {
        &self.staged
    }

    pub(crate) fn sign(&mut self, words: &[u64]) {
        self.signature.extend_from_slice(words);
    }

    pub(crate) fn sign_str(&mut self, s: &str) {
        // FNV-1a: a cheap fingerprint of the kernel name.
        let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        self.signature.push(h);
    }

    /// Places `bytes` (an argument of role `role`) in the step's plan, signs the placement, and writes the bytes
    /// with `write(offset, bytes)` when they take a new region. Returns the placement.
    pub(crate) fn stage(&mut self, role: Role, bytes: &[u8], write: &mut dyn FnMut(usize, &[u8])) -> Result<Placement> {
        let placed = self.plan.place(bytes)?;
        self.sign(&[0x5354_4147]);
        self.sign(&placed.signature(bytes.len()));
        if let Placement::New(at) = placed {
            write(at, bytes);
        }
        self.staged.push(Staged { role, placed, len: bytes.len() });
        if let Some(e) = &self.expect
            && (bytes.is_empty() || e.bytes(role) != Some(bytes))
        {
            self.traced = false;
        }
        Ok(placed)
    }

    /// The embedding checked its ids against a table of `vocab` rows.
    pub(crate) fn note_vocab(&mut self, vocab: usize) {
        self.bounds.vocab = Some(self.bounds.vocab.map_or(vocab, |v| v.min(vocab)));
    }

    /// The KV store checked its slots against caches of `capacity` rows.
    pub(crate) fn note_slot_capacity(&mut self, capacity: usize) {
        self.bounds.slots = Some(self.bounds.slots.map_or(capacity, |c| c.min(capacity)));
    }

    /// Decode attention ran `n_splits` splits over caches of `n_slots` rows in blocks of `block_tokens`.
    pub(crate) fn note_attention(&mut self, n_splits: usize, n_slots: usize, block_tokens: usize) {
        let b = &mut self.bounds;
        if b.n_splits.is_some_and(|s| s != n_splits) || b.attn.is_some_and(|(_, bt)| bt != block_tokens) {
            self.traced = false;
        }
        b.n_splits = Some(n_splits);
        b.attn = Some((b.attn.map_or(n_slots, |(n, _)| n.min(n_slots)), block_tokens));
    }

    /// The direct replay of the step just captured, if every staged argument came from its inputs (see the module);
    /// `None` leaves the graph to walked replays.
    pub(crate) fn finish_capture(&self) -> Option<DirectPlan> {
        let e = self.expect.as_ref().filter(|_| self.traced)?;
        let mut firsts: Vec<Staged> = Vec::new();
        for s in &self.staged {
            match firsts.iter().find(|f| f.role == s.role) {
                // A later staging of a role must reuse its first region (same bytes); anything else is not a step
                // of the shape the direct replay knows.
                Some(f) if s.placed == Placement::Reused(f.placed.offset()) && s.len == f.len => {}
                Some(_) => return None,
                None => firsts.push(*s),
            }
        }
        let has = |r: Role| firsts.iter().any(|f| f.role == r);
        let needed = [Role::Positions, Role::Slots, Role::RowInfo, Role::Tables];
        if !needed.iter().all(|&r| has(r)) || has(Role::Ids) != e.has_ids || has(Role::Other) {
            return None;
        }
        let b = self.bounds;
        if b.n_splits != Some(e.n_splits) || b.slots.is_none() || b.attn.is_none() || b.vocab.is_some() != e.has_ids {
            return None;
        }
        Some(DirectPlan {
            firsts,
            used: self.plan.used(),
            n_splits: e.n_splits,
            seq_rows: e.seq_rows.clone(),
            rows: e.rows,
            has_ids: e.has_ids,
            tag: e.tag,
            bounds: b,
        })
    }
}

/// A captured step's direct replay: see the module.
#[derive(Debug)]
pub(crate) struct DirectPlan {
    /// The first staging of each role, in step order.
    firsts: Vec<Staged>,
    /// Bytes of the staging area the step uses (what the one copy moves).
    used: usize,
    n_splits: usize,
    /// (first row, rows) of each attention sequence.
    seq_rows: Vec<(usize, usize)>,
    rows: usize,
    has_ids: bool,
    tag: u64,
    bounds: Bounds,
}

impl DirectPlan {
    /// Bytes one launch copies.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// When `inputs` make a step that the captured graph computes (same shape, split count, placements, and inputs
    /// the ops would accept), writes its distinct staged arguments with `write(offset, bytes)` into the free host
    /// half and returns the bytes to copy before the graph; `None` when it does not (nothing to launch: run the
    /// step eagerly or capture it again). `plan` is scratch (rewound here).
    pub(crate) fn stage(
        &self,
        inputs: &StepInputs<'_>,
        plan: &mut StagePlan,
        write: &mut dyn FnMut(usize, &[u8]),
    ) -> Option<usize> {
        let rows = self.rows;
        let same_shape = inputs.tag == self.tag
            && inputs.positions.len() == rows
            && inputs.slots.len() == rows
            && inputs.ids.is_some() == self.has_ids
            && inputs.ids.is_none_or(|ids| ids.len() == rows)
            && inputs.seqs.len() == self.seq_rows.len()
            && inputs.seqs.iter().zip(&self.seq_rows).all(|(s, &(r0, n))| s.rows.start == r0 && s.rows.len() == n);
        if !same_shape || !self.in_bounds(inputs) {
            return None;
        }
        let enc = Encoded::new(inputs)?;
        if enc.attn.n_splits != self.n_splits {
            return None;
        }
        plan.rewind();
        for f in &self.firsts {
            let bytes = enc.bytes(f.role)?;
            if bytes.len() != f.len || plan.place(bytes).ok()? != f.placed {
                return None;
            }
            if let Placement::New(at) = f.placed {
                write(at, bytes);
            }
        }
        (plan.used() == self.used).then_some(self.used)
    }

    /// The checks the embedding, the KV store and attention make (ops.rs), against the bounds they saw at capture.
    fn in_bounds(&self, inputs: &StepInputs<'_>) -> bool {
        let b = self.bounds;
        let ids_ok = match (inputs.ids, b.vocab) {
            (Some(ids), Some(vocab)) => ids.iter().all(|&id| (id as usize) < vocab),
            (None, _) => true,
            (Some(_), None) => false,
        };
        let slots_ok = b.slots.is_some_and(|cap| inputs.slots.iter().all(|&s| (s as usize) < cap));
        let attn_ok = b.attn.is_some_and(|(n_slots, bt)| {
            inputs.seqs.iter().all(|s| {
                let end = s.pos0 + s.rows.len();
                let needed = end.div_ceil(bt);
                end <= u32::MAX as usize
                    && needed <= s.block_table.len()
                    && s.block_table[..needed].iter().all(|&blk| (blk as usize + 1) * bt <= n_slots)
            })
        });
        ids_ok && slots_ok && attn_ok
    }
}

/// A model of the shard's decode step on the host side of the CUDA ops, and batches of it (tests and `cost`).
#[cfg(test)]
mod tests_support {
    use std::cell::Cell;

    use super::super::stage_plan::GRAPH_STAGING_BYTES;
    use super::*;
    use crate::rng::SplitMix64 as Rng;

    /// The host side of the CUDA ops of one decode step of `Shard::forward_batch` (node/src/model/shard.rs), as the
    /// CUDA backend runs them in capture or replay mode: the embedding stages the ids, each layer's fused
    /// rope + KV store stages positions and slots, decode attention stages row infos and tables (built by the same
    /// `decode_attention_args` as ops.rs) and launches by split count; the other launches sign their fixed shapes.
    /// `calls` counts backend ops.
    pub(super) struct FakeShard {
        layers: usize,
        vocab: usize,
        n_slots: usize,
        block_tokens: usize,
        pub(super) calls: Cell<usize>,
    }

    impl FakeShard {
        pub(super) fn new(layers: usize) -> Self {
            Self { layers, vocab: 1000, n_slots: 16 * 4096, block_tokens: 16, calls: Cell::new(0) }
        }

        fn op(&self, rec: &mut StepRecording, name: &str, words: &[u64]) {
            self.calls.set(self.calls.get() + 1);
            rec.sign_str(name);
            rec.sign(words);
        }

        pub(super) fn step(&self, rec: &mut StepRecording, half: &mut [u8], inputs: &StepInputs<'_>) -> Result<()> {
            let rows = inputs.positions.len() as u64;
            let mut write = |at: usize, b: &[u8]| half[at..at + b.len()].copy_from_slice(b);
            // The ops' checks (ops.rs): ids inside the table, slots inside the caches, every block read inside
            // the table and the caches; a failed check fails the op before it stages or signs anything.
            let bad = |what: &str| Err(crate::error::KernelError::Cuda(format!("{what} out of bounds")));
            if let Some(ids) = inputs.ids {
                if ids.iter().any(|&id| id as usize >= self.vocab) {
                    return bad("id");
                }
                rec.note_vocab(self.vocab);
                rec.stage(Role::Ids, bytemuck::cast_slice(ids), &mut write)?;
                self.op(rec, "embedding", &[rows]);
            }
            self.op(rec, "rms_norm", &[rows]);
            for layer in 0..self.layers as u64 {
                self.op(rec, "matmul_many", &[rows, layer]);
                if inputs.slots.iter().any(|&s| s as usize >= self.n_slots) {
                    return bad("slot");
                }
                rec.note_slot_capacity(self.n_slots);
                rec.stage(Role::Positions, bytemuck::cast_slice(inputs.positions), &mut write)?;
                rec.stage(Role::Slots, bytemuck::cast_slice(inputs.slots), &mut write)?;
                self.op(rec, "rope_kv_store", &[rows, layer]);
                let bt = self.block_tokens;
                if inputs.seqs.iter().any(|s| {
                    let needed = (s.pos0 + s.rows.len()).div_ceil(bt);
                    needed > s.block_table.len()
                        || s.block_table[..needed].iter().any(|&b| (b as usize + 1) * bt > self.n_slots)
                }) {
                    return bad("block");
                }
                let a = decode_attention_args(inputs.positions.len(), inputs.seqs);
                rec.note_attention(a.n_splits, self.n_slots, self.block_tokens);
                rec.stage(Role::RowInfo, bytemuck::cast_slice(&a.row_info), &mut write)?;
                rec.stage(Role::Tables, bytemuck::cast_slice(&a.tables), &mut write)?;
                // The split count sets the grid, an argument and the workspace (a graph buffer) of the launches.
                self.op(rec, "attn_decode", &[a.n_splits as u64, rows, layer]);
                self.op(rec, "attn_combine", &[a.n_splits as u64, rows]);
                for name in ["matmul_o", "add_rms_norm", "matmul_swiglu", "matmul_down", "add_rms_norm"] {
                    self.op(rec, name, &[rows, layer]);
                }
            }
            self.op(rec, "head", &[rows]);
            Ok(())
        }
    }

    /// One padded decode batch: each row one session at position `lens[i]` with a table of `tables[i]` blocks.
    pub(super) struct Batch {
        pub(super) ids: Option<Vec<u32>>,
        pub(super) positions: Vec<u32>,
        pub(super) slots: Vec<u32>,
        pub(super) tables: Vec<Vec<u32>>,
        pub(super) tag: u64,
    }

    impl Batch {
        pub(super) fn new(first_stage: bool, lens: &[usize], table_blocks: &[usize], base: &[u32]) -> Self {
            let tables: Vec<Vec<u32>> =
                table_blocks.iter().zip(base).map(|(&n, &b)| (0..n as u32).map(|i| b + i).collect()).collect();
            Self::with_tables(first_stage, lens, tables)
        }

        pub(super) fn with_tables(first_stage: bool, lens: &[usize], tables: Vec<Vec<u32>>) -> Self {
            let positions: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
            let slots = lens.iter().zip(&tables).map(|(&l, t)| t[l / 16] * 16 + (l % 16) as u32).collect();
            let ids = first_stage.then(|| lens.iter().map(|&l| (l * 7 + 3) as u32 % 1000).collect());
            Self { ids, positions, slots, tables, tag: 1 }
        }

        pub(super) fn random(rng: &mut Rng, bucket: usize, first_stage: bool) -> Self {
            let blocks: Vec<usize> = (0..bucket).map(|_| 1 + rng.below(8) as usize).collect();
            let lens: Vec<usize> = blocks.iter().map(|&b| rng.below((b * 16) as u64) as usize).collect();
            // Disjoint block ranges per session.
            let base: Vec<u32> = (0..bucket as u32).map(|i| i * 8 + rng.below(2) as u32).collect();
            Self::new(first_stage, &lens, &blocks, &base)
        }

        pub(super) fn seqs(&self) -> Vec<AttnSeq<'_>> {
            self.tables
                .iter()
                .enumerate()
                .map(|(i, t)| AttnSeq { rows: i..i + 1, pos0: self.positions[i] as usize, block_table: t })
                .collect()
        }
    }

    pub(super) fn inputs<'a>(b: &'a Batch, seqs: &'a [AttnSeq<'a>]) -> StepInputs<'a> {
        StepInputs { ids: b.ids.as_deref(), positions: &b.positions, slots: &b.slots, seqs, tag: b.tag }
    }

    /// Captures `b`'s step; returns the recording (with the capture's signature) and the direct plan.
    pub(super) fn capture(shard: &FakeShard, b: &Batch) -> (StepRecording, Vec<u64>, Option<DirectPlan>) {
        let mut rec = StepRecording::new(GRAPH_STAGING_BYTES);
        let seqs = b.seqs();
        let mut half = vec![0u8; GRAPH_STAGING_BYTES];
        rec.begin(Some(&inputs(b, &seqs)));
        shard.step(&mut rec, &mut half, &inputs(b, &seqs)).expect("capture");
        let direct = rec.finish_capture();
        let signature = rec.signature().to_vec();
        (rec, signature, direct)
    }
}

#[cfg(test)]
mod tests {
    use super::super::stage_plan::tests::{Op, Recorder};
    use super::super::stage_plan::{DoubleStage, GRAPH_STAGING_BYTES};
    use super::tests_support::*;
    use super::*;
    use crate::rng::SplitMix64 as Rng;

    /// The walked replay of `b` (the step run in replay mode): whether its signature equals the capture's, its
    /// host half and its staging.
    fn walked(shard: &FakeShard, rec: &mut StepRecording, captured: &[u64], b: &Batch) -> (bool, Vec<u8>, Vec<Staged>) {
        let seqs = b.seqs();
        let mut half = vec![0u8; GRAPH_STAGING_BYTES];
        rec.begin(None);
        let ok = shard.step(rec, &mut half, &inputs(b, &seqs)).is_ok();
        (ok && rec.signature() == captured, half, rec.staged().to_vec())
    }

    fn direct(plan: &DirectPlan, b: &Batch) -> (Option<usize>, Vec<u8>) {
        let seqs = b.seqs();
        let mut half = vec![0u8; GRAPH_STAGING_BYTES];
        let mut scratch = StagePlan::new(GRAPH_STAGING_BYTES);
        let used = plan
            .stage(&inputs(b, &seqs), &mut scratch, &mut |at, bytes| half[at..at + bytes.len()].copy_from_slice(bytes));
        (used, half)
    }

    #[test]
    fn direct_staging_equals_the_walked_replay_byte_for_byte_for_random_batches() {
        let mut rng = Rng::new(16);
        let (mut matched, mut missed) = (0, 0);
        for round in 0..300 {
            let bucket = [1, 2, 4, 8, 16][round % 5];
            let first_stage = round % 3 != 0;
            let shard = FakeShard::new(1 + round % 4);
            let cap = Batch::random(&mut rng, bucket, first_stage);
            let (mut rec, captured, plan) = capture(&shard, &cap);
            let plan = plan.expect("a step of the shard's shape is direct-capable");
            assert_eq!(plan.used(), rec.plan.used());
            for _ in 0..4 {
                // The next step of the same sessions (one position on) or a new random batch of the bucket.
                let next = if rng.below(2) == 0 {
                    let lens: Vec<usize> = cap.positions.iter().map(|&p| p as usize + 1).collect();
                    let blocks: Vec<usize> = cap.tables.iter().map(Vec::len).collect();
                    let base: Vec<u32> = cap.tables.iter().map(|t| t[0]).collect();
                    if lens.iter().zip(&blocks).any(|(&l, &b)| l >= b * 16) {
                        continue;
                    }
                    Batch::new(first_stage, &lens, &blocks, &base)
                } else {
                    Batch::random(&mut rng, bucket, first_stage)
                };
                let (walk_ok, walk_half, walk_staged) = walked(&shard, &mut rec, &captured, &next);
                let calls = shard.calls.get();
                let (used, direct_half) = direct(&plan, &next);
                assert_eq!(shard.calls.get(), calls, "a direct replay calls no op");
                assert_eq!(used.is_some(), walk_ok, "round {round}: direct and walked replays disagree on matching");
                if let Some(used) = used {
                    matched += 1;
                    assert_eq!(used, rec.plan.used());
                    assert_eq!(direct_half[..used], walk_half[..used], "round {round}: staged bytes");
                    // Same placements as the capture, every layer.
                    let mut cap_rec = StepRecording::new(GRAPH_STAGING_BYTES);
                    let seqs = cap.seqs();
                    cap_rec.begin(None);
                    shard.step(&mut cap_rec, &mut vec![0; GRAPH_STAGING_BYTES], &inputs(&cap, &seqs)).expect("cap");
                    assert_eq!(walk_staged, cap_rec.staged());
                } else {
                    missed += 1;
                }
            }
        }
        // Both outcomes were exercised.
        assert!(matched > 100 && missed > 50, "{matched} matched, {missed} missed");
    }

    #[test]
    fn changed_shapes_are_detected() {
        let shard = FakeShard::new(3);
        let base = [0u32, 8, 16, 24];
        let cap = Batch::new(true, &[40, 30, 20, 17], &[4, 4, 4, 4], &base);
        let (mut rec, captured, plan) = capture(&shard, &cap);
        let plan = plan.expect("direct");
        let check = |rec: &mut StepRecording, b: &Batch, want: bool, what: &str| {
            let (walk_ok, _, _) = walked(&shard, rec, &captured, b);
            assert_eq!(walk_ok, want, "{what}: walked");
            assert_eq!(direct(&plan, b).0.is_some(), want, "{what}: direct");
        };
        check(&mut rec, &Batch::new(true, &[41, 31, 21, 18], &[4, 4, 4, 4], &base), true, "next step");
        // The longest context crosses 64 keys: two attention splits instead of one.
        check(&mut rec, &Batch::new(true, &[64, 31, 21, 18], &[5, 4, 4, 4], &base), false, "split count growth");
        check(&mut rec, &Batch::new(true, &[63, 31, 21, 18], &[4, 4, 4, 4], &base), true, "63 keys, one split");
        // A longer block table (same contexts): the tables are longer, every later region moves.
        check(&mut rec, &Batch::new(true, &[41, 31, 21, 18], &[4, 5, 4, 4], &base), false, "longer block table");
        // Positions equal to the ids: at capture they differed, so the replay's placement differs.
        let mut same = Batch::new(true, &[41, 31, 21, 18], &[4, 4, 4, 4], &base);
        same.ids = Some(same.positions.clone());
        check(&mut rec, &same, false, "coinciding arguments");
        // Another tag (e.g. other head rows) or ids out of the table: not replayed directly.
        let mut tagged = Batch::new(true, &[41, 31, 21, 18], &[4, 4, 4, 4], &base);
        tagged.tag = 2;
        assert_eq!(direct(&plan, &tagged).0, None, "tag");
        let mut bad = Batch::new(true, &[41, 31, 21, 18], &[4, 4, 4, 4], &base);
        bad.ids = Some(vec![1, 2, 3, 1000]);
        check(&mut rec, &bad, false, "id outside the vocabulary");
    }

    #[test]
    fn a_capture_whose_arguments_coincide_replays_only_while_they_do() {
        // Session in block 0 below position 16: its slot equals its position (a fresh shard's first session).
        let shard = FakeShard::new(2);
        let cap = Batch::with_tables(false, &[5], vec![vec![0, 5]]);
        assert_eq!(cap.positions, cap.slots);
        let (mut rec, captured, plan) = capture(&shard, &cap);
        let plan = plan.expect("direct");
        assert!(rec.staged().iter().any(|s| s.role == Role::Slots && matches!(s.placed, Placement::Reused(_))));
        for (len, want) in [(6, true), (15, true), (16, false)] {
            let b = Batch::with_tables(false, &[len], vec![vec![0, 5]]);
            assert_eq!(walked(&shard, &mut rec, &captured, &b).0, want, "position {len}: walked");
            assert_eq!(direct(&plan, &b).0.is_some(), want, "position {len}: direct");
        }
    }

    #[test]
    fn a_step_staging_something_else_than_its_inputs_is_left_to_walked_replays() {
        let shard = FakeShard::new(2);
        let b = Batch::new(true, &[3, 4], &[1, 1], &[0, 8]);
        let seqs = b.seqs();
        let mut rec = StepRecording::new(GRAPH_STAGING_BYTES);
        let mut half = vec![0u8; GRAPH_STAGING_BYTES];
        let mut write = |at: usize, bytes: &[u8]| half[at..at + bytes.len()].copy_from_slice(bytes);
        // Positions that are not the step's.
        let mut wrong = b.positions.clone();
        wrong[0] += 1;
        let other = StepInputs { positions: &wrong, ..inputs(&b, &seqs) };
        rec.begin(Some(&inputs(&b, &seqs)));
        shard.step(&mut rec, &mut vec![0; GRAPH_STAGING_BYTES], &other).expect("step");
        assert!(rec.finish_capture().is_none());
        // A prefill-style argument.
        rec.begin(Some(&inputs(&b, &seqs)));
        shard.step(&mut rec, &mut vec![0; GRAPH_STAGING_BYTES], &inputs(&b, &seqs)).expect("step");
        assert!(rec.finish_capture().is_some());
        rec.stage(Role::Other, &[1, 2, 3, 4], &mut write).expect("stage");
        assert!(rec.finish_capture().is_none());
        // Captured without inputs.
        rec.begin(None);
        shard.step(&mut rec, &mut vec![0; GRAPH_STAGING_BYTES], &inputs(&b, &seqs)).expect("step");
        assert!(rec.finish_capture().is_none());
    }

    #[test]
    fn a_direct_replay_is_one_staging_copy_and_the_graph_and_calls_no_op() {
        // As graph.rs launches a direct replay: take a half, write the step's arguments from its inputs, one copy
        // of the used bytes and the graph.
        let shard = FakeShard::new(32);
        let blocks = [256, 256, 256, 256];
        let base = [0u32, 256, 512, 768];
        let cap = Batch::new(true, &[100, 200, 300, 400], &blocks, &base);
        let (_, _, plan) = capture(&shard, &cap);
        let plan = plan.expect("direct");
        let (mut stage, mut ops) = (DoubleStage::new(), Recorder::default());
        let mut halves = [vec![0u8; GRAPH_STAGING_BYTES], vec![0u8; GRAPH_STAGING_BYTES]];
        let mut scratch = StagePlan::new(GRAPH_STAGING_BYTES);
        let calls = shard.calls.get();
        for s in 0..6usize {
            ops.0.clear();
            let b = Batch::new(true, &[101 + s, 201 + s, 301 + s, 401 + s], &blocks, &base);
            let seqs = b.seqs();
            let half = stage.begin(&mut ops).expect("begin");
            let used = plan
                .stage(&inputs(&b, &seqs), &mut scratch, &mut |at, bytes| {
                    halves[half][at..at + bytes.len()].copy_from_slice(bytes)
                })
                .expect("the next steps match");
            stage.launch(&mut ops, used).expect("launch");
            // Ids, positions, slots, row infos and 1024 table entries: written once, not once per layer.
            assert_eq!(used, 16 * 3 + 32 + 4096);
            let want = if s < 2 {
                vec![Op::Copy(half, used), Op::Launch]
            } else {
                vec![Op::Wait(half), Op::Copy(half, used), Op::Launch]
            };
            assert_eq!(ops.0, want, "step {s}");
            assert_eq!(half, s % 2);
        }
        assert_eq!(shard.calls.get(), calls, "no backend op during direct replays");
    }
}

/// Host cost of one replay, for docs/CUDA.md: run under callgrind (`--toggle-collect='*direct_once*'` or
/// `'*walked_once*'`) it gives the instructions of 100 direct replays and of 100 replays of the walked model of a
/// 32-layer step of 8 sessions with 2k-token reservations (128 blocks each; `SHARDLINE_REPLAY_COST=1`: one session,
/// 30 layers). Ignored: it asserts nothing a test above does not.
#[cfg(test)]
mod cost {
    use super::super::stage_plan::GRAPH_STAGING_BYTES;
    use super::tests_support::*;
    use super::*;

    #[inline(never)]
    fn direct_once(plan: &DirectPlan, inputs: &StepInputs<'_>, scratch: &mut StagePlan, half: &mut [u8]) -> usize {
        plan.stage(inputs, scratch, &mut |at, b| half[at..at + b.len()].copy_from_slice(b)).expect("matches")
    }

    #[inline(never)]
    fn walked_once(shard: &FakeShard, rec: &mut StepRecording, inputs: &StepInputs<'_>, half: &mut [u8]) -> usize {
        rec.begin(None);
        shard.step(rec, half, inputs).expect("walks");
        rec.signature().len()
    }

    #[test]
    #[ignore]
    fn host_cost_of_a_replay() {
        // `SHARDLINE_REPLAY_COST=1`: one session on 30 layers (SmolLM2's shape), else 8 sessions on 32 layers.
        let (sessions, layers) =
            if std::env::var("SHARDLINE_REPLAY_COST").is_ok_and(|v| v == "1") { (1, 30) } else { (8, 32) };
        let shard = FakeShard::new(layers);
        let blocks = vec![128; sessions];
        let base: Vec<u32> = (0..sessions as u32).map(|i| i * 128).collect();
        // Contexts of 1101 to 1271 keys: 32 attention splits throughout (a replay past 2048 keys would not match).
        let lens = |s: usize| -> Vec<usize> { (0..sessions).map(|i| 1100 + 10 * i + s).collect() };
        let cap = Batch::new(true, &lens(0), &blocks, &base);
        let (mut rec, _, plan) = capture(&shard, &cap);
        let plan = plan.expect("direct");
        let mut half = vec![0u8; GRAPH_STAGING_BYTES];
        let mut scratch = StagePlan::new(GRAPH_STAGING_BYTES);
        let (mut used, mut words) = (0, 0);
        for s in 1..=100 {
            let b = Batch::new(true, &lens(s), &blocks, &base);
            let seqs = b.seqs();
            used += direct_once(&plan, &inputs(&b, &seqs), &mut scratch, &mut half);
            words += walked_once(&shard, &mut rec, &inputs(&b, &seqs), &mut half);
        }
        println!("100 replays: {used} bytes staged directly, {words} signature words walked");
    }
}

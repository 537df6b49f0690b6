//! The decode step through `Shard::forward_batch_stepped` (CUDA graphs per batch-size bucket, docs/CUDA.md): a
//! batch of decode rows is padded to its bucket with idle sessions and goes through `Backend::graph_step`.
//!
//! On the CPU (`force_step_graphs`, where `graph_step` runs the step eagerly) every session's logits must be
//! bit-for-bit those of the session decoding alone, whatever the batch size and padding, its KV length must grow by
//! exactly one per step, and the key must be the batch's bucket; prefill batches run unpadded. The step inputs the
//! shard hands the backend (`StepInputs`, from which a graph backend writes a replayed step's staged arguments
//! without running the step) must be exactly what every layer hands its ops (`step_inputs_are_what_every_layer_hands_its_ops`,
//! with a backend that watches the ops). On a GPU
//! (`graph_replay_equals_eager_on_cuda`, which prints "skipped: no CUDA device" without one and fails instead with
//! `SHARDLINE_REQUIRE_GPU=1`), the steps that were captured and replayed give bit-for-bit the logits of the same
//! padded batch run eagerly through `Shard::forward_batch`, and the replays are direct (the step is not run).

use std::sync::{Arc, Mutex};

use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::step_graph::{GraphKey, StepInputs, StepRun, bucket};
use shardline_kernels::{
    AttnSeq, AttnShape, Backend, DType, DeviceKind, HostBytes, RopeConfig, Sampled, SamplingParams, Tensor,
};
use shardline_node::model::{
    BatchItem, HeadRows, LayerRange, ModelFiles, Shard, ShardInput, ShardKv, ShardOptions, ShardOutput,
};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

fn tiny_model(dir: &tempfile::TempDir) -> ModelFiles {
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: 2, ..TinySpec::default() }, &path).expect("tiny model written");
    ModelFiles::open(&path).expect("tiny model opens")
}

fn whole_shard(files: &ModelFiles, backend: Arc<dyn Backend>) -> Shard {
    let n = files.config().n_layers;
    let opts = ShardOptions { kv_budget_bytes: 16 << 20, block_tokens: 16 };
    Shard::load(files.weights().as_ref(), LayerRange::new(0, n), backend, opts).expect("shard loads")
}

fn bits(b: &dyn Backend, t: &Tensor) -> Vec<u32> {
    b.download_f32(t).expect("download").into_iter().map(f32::to_bits).collect()
}

fn logits(out: ShardOutput) -> Tensor {
    match out {
        ShardOutput::Logits(l) => l,
        ShardOutput::Hidden(_) => panic!("a whole-model shard returns logits"),
    }
}

/// Sessions with distinct prompts, prefilled; returns their KV caches and their next input tokens.
fn prefilled(shard: &Shard, n: usize, vocab: u32) -> Vec<(ShardKv, u32)> {
    (0..n)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i % 4).map(|j| ((i * 37 + j * 11 + 5) as u32) % vocab).collect();
            let mut kv = shard.open_session(64).expect("session");
            shard.forward(&mut kv, ShardInput::Tokens(&prompt)).expect("prefill");
            (kv, (i as u32 * 7 + 1) % vocab)
        })
        .collect()
}

#[test]
fn padded_decode_steps_equal_each_session_alone_on_the_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tiny_model(&dir);
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(1));
    let stepped = whole_shard(&files, backend.clone());
    let alone = whole_shard(&files, backend.clone());
    stepped.force_step_graphs(true);
    let vocab = files.config().vocab as u32;
    let sessions = 9;
    let mut batched = prefilled(&stepped, sessions, vocab);
    let mut solo = prefilled(&alone, sessions, vocab);
    let free = stepped.free_kv_tokens();
    // Batch sizes across buckets 1, 2, 4, 8, 16 (9 sessions: the last ones decode more often).
    for (step, n) in [1usize, 3, 5, 2, 9, 4, 7, 1, 8, 6].into_iter().enumerate() {
        let chosen: Vec<usize> = (0..n).map(|j| (sessions - n + j + step) % sessions).collect();
        let tokens: Vec<[u32; 1]> = chosen.iter().map(|&i| [batched[i].1]).collect();
        let before: Vec<usize> = chosen.iter().map(|&i| batched[i].0.len()).collect();
        let outs = {
            let mut mine: Vec<Option<&mut (ShardKv, u32)>> = batched.iter_mut().map(Some).collect();
            let mut items: Vec<BatchItem<'_>> = chosen
                .iter()
                .zip(&tokens)
                .map(|(&i, t)| {
                    let s = mine[i].take().expect("each session once per step");
                    BatchItem { kv: &mut s.0, input: ShardInput::Tokens(t), head: HeadRows::Last }
                })
                .collect();
            stepped.forward_batch_stepped(&mut items, stepped.layers()).expect("stepped decode")
        };
        assert_eq!(outs.len(), n, "step {step}: one output per item, pads dropped");
        let key = GraphKey {
            owner: stepped.graph_owner(),
            bucket: bucket(n).expect("a bucket"),
            span: (0, files.config().n_layers),
        };
        assert_eq!(stepped.last_graph_step(), Some((key, StepRun::Eager)), "step {step}: key of a batch of {n}");
        for ((&i, out), before) in chosen.iter().zip(outs).zip(before) {
            assert_eq!(batched[i].0.len(), before + 1, "step {step}: session {i} grew by one position");
            let got = bits(backend.as_ref(), &logits(out));
            let (kv, next) = &mut solo[i];
            let want = logits(alone.forward(kv, ShardInput::Tokens(&[*next])).expect("alone"));
            assert_eq!(got, bits(backend.as_ref(), &want), "step {step}: session {i}'s logits (batch of {n})");
            let t = alone.sample(&want, &shardline_kernels::SamplingParams::GREEDY, kv.len() as u64, 0).expect("s");
            solo[i].1 = t.token;
            batched[i].1 = t.token;
        }
    }
    // The padding sessions (one KV block each) were opened once, as many as the largest padding: 16 - 9 = 7.
    assert_eq!(free - stepped.free_kv_tokens(), 7 * 16, "pads opened");
    // A prefill chunk is not a decode step: it runs unpadded and leaves the last key as it was.
    let last = stepped.last_graph_step();
    let prompt = [1u32, 2, 3];
    let mut items = [BatchItem { kv: &mut batched[0].0, input: ShardInput::Tokens(&prompt), head: HeadRows::Last }];
    let out = stepped.forward_batch_stepped(&mut items, stepped.layers()).expect("prefill");
    assert_eq!(out.len(), 1);
    assert_eq!(stepped.last_graph_step(), last);
}

/// A stage fed hidden states (the second half of the model): padded decode steps through the per-slot input
/// tensors give each session bit-for-bit the logits it gets alone.
#[test]
fn padded_hidden_state_steps_equal_each_session_alone_on_the_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tiny_model(&dir);
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(1));
    let n_layers = files.config().n_layers;
    let opts = ShardOptions { kv_budget_bytes: 16 << 20, block_tokens: 16 };
    let load = |a: usize, b: usize| {
        Shard::load(files.weights().as_ref(), LayerRange::new(a, b), backend.clone(), opts.clone()).expect("shard")
    };
    let (front, back, back_alone) = (load(0, 1), load(1, n_layers), load(1, n_layers));
    back.force_step_graphs(true);
    let sessions = 5;
    let mut kv: Vec<(ShardKv, ShardKv, ShardKv)> = (0..sessions)
        .map(|_| {
            (
                front.open_session(16).expect("f"),
                back.open_session(16).expect("b"),
                back_alone.open_session(16).expect("a"),
            )
        })
        .collect();
    for (step, n) in [3usize, 5, 1, 2, 4].into_iter().enumerate() {
        let chosen: Vec<usize> = (0..n).map(|j| (j + step) % sessions).collect();
        // Front half eagerly, one session at a time (its output is the same as batched, tested in shard_batch.rs).
        let hidden: Vec<Tensor> = chosen
            .iter()
            .map(|&i| {
                let t = [((i * 13 + step * 7) % 50) as u32];
                match front.forward(&mut kv[i].0, ShardInput::Tokens(&t)).expect("front") {
                    ShardOutput::Hidden(h) => h,
                    ShardOutput::Logits(_) => panic!("front half ends before the head"),
                }
            })
            .collect();
        let outs = {
            let mut mine: Vec<Option<&mut (ShardKv, ShardKv, ShardKv)>> = kv.iter_mut().map(Some).collect();
            let mut items: Vec<BatchItem<'_>> = chosen
                .iter()
                .zip(&hidden)
                .map(|(&i, h)| {
                    let s = mine[i].take().expect("each session once per step");
                    BatchItem { kv: &mut s.1, input: ShardInput::Hidden(h), head: HeadRows::Last }
                })
                .collect();
            back.forward_batch_stepped(&mut items, back.layers()).expect("stepped decode")
        };
        assert_eq!(back.last_graph_step().map(|(k, _)| k.bucket), bucket(n), "step {step}");
        for ((&i, out), h) in chosen.iter().zip(outs).zip(&hidden) {
            let want = logits(back_alone.forward(&mut kv[i].2, ShardInput::Hidden(h)).expect("alone"));
            assert_eq!(bits(backend.as_ref(), &logits(out)), bits(backend.as_ref(), &want), "step {step}, session {i}");
            assert_eq!(kv[i].1.len(), kv[i].2.len());
        }
    }
}

#[test]
fn graph_replay_equals_eager_on_cuda() {
    use shardline_kernels::DType;
    use shardline_kernels::cuda::{self, CudaBackend};
    if let Err(reason) = cuda::probe() {
        let required = std::env::var("SHARDLINE_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(!required, "SHARDLINE_REQUIRE_GPU=1 but no usable CUDA device: {reason}");
        println!("skipped: no CUDA device ({reason})");
        return;
    }
    let cuda: Arc<dyn Backend> = CudaBackend::new(0, DType::F16).expect("CUDA backend");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tiny_model(&dir);
    let graphed = whole_shard(&files, cuda.clone());
    let eager = whole_shard(&files, cuda.clone());
    let vocab = files.config().vocab as u32;
    let n = 3; // bucket 4: one pad
    let mut a = prefilled(&graphed, n, vocab);
    let mut b = prefilled(&eager, n, vocab);
    let mut runs = Vec::new();
    for step in 0..12 {
        let tokens: Vec<[u32; 1]> = a.iter().map(|s| [s.1]).collect();
        let got = {
            let mut items: Vec<BatchItem<'_>> = a
                .iter_mut()
                .zip(&tokens)
                .map(|(s, t)| BatchItem { kv: &mut s.0, input: ShardInput::Tokens(t), head: HeadRows::Last })
                .collect();
            graphed.forward_batch_stepped(&mut items, graphed.layers()).expect("graphed step")
        };
        runs.push(graphed.last_graph_step().expect("a graph step").1);
        let got: Vec<Vec<u32>> = got.into_iter().map(|o| bits(cuda.as_ref(), &logits(o))).collect();
        // The same padded batch, eagerly.
        let want = {
            let pad_token = [0u32];
            let mut pad = eager.open_session(1).expect("pad");
            let mut items: Vec<BatchItem<'_>> = b
                .iter_mut()
                .zip(&tokens)
                .map(|(s, t)| BatchItem { kv: &mut s.0, input: ShardInput::Tokens(t), head: HeadRows::Last })
                .collect();
            items.push(BatchItem { kv: &mut pad, input: ShardInput::Tokens(&pad_token), head: HeadRows::Last });
            eager.forward_batch(&mut items, eager.layers()).expect("eager step")
        };
        for (i, (g, w)) in got.iter().zip(want.into_iter().take(n)).enumerate() {
            assert_eq!(g, &bits(cuda.as_ref(), &logits(w)), "step {step}, session {i}: replay vs eager");
            let next = g.iter().enumerate().max_by(|x, y| f32::from_bits(*x.1).total_cmp(&f32::from_bits(*y.1)));
            let t = next.map_or(0, |(id, _)| id as u32);
            a[i].1 = t;
            b[i].1 = t;
        }
    }
    assert!(runs.contains(&StepRun::Captured), "{runs:?}");
    // Replays from the step's inputs alone (the node's decode step never walks its layers to replay).
    assert!(runs.iter().filter(|&&r| r == StepRun::ReplayedDirect).count() >= 8, "{runs:?}");
    assert!(!runs.contains(&StepRun::Replayed), "{runs:?}");
}

/// The arguments one decode step handed the ops that stage them on CUDA (embedding, RoPE + KV store, attention).
#[derive(Default)]
struct Seen {
    ids: Vec<Vec<u32>>,
    positions: Vec<Vec<u32>>,
    slots: Vec<Vec<u32>>,
    seqs: Vec<SeqView>,
}

/// (rows, pos0, block table) of each sequence of an attention call.
type SeqView = Vec<(std::ops::Range<usize>, usize, Vec<u32>)>;

/// The CPU backend, watching what a decode step hands its ops and comparing it, after the step, with the step's
/// inputs (`Backend::graph_step`). Every other op is the CPU backend's.
#[derive(Debug)]
struct Watch {
    cpu: CpuBackend,
    seen: Mutex<Option<SeenBox>>,
    /// (steps checked, layers seen, mismatches).
    report: Mutex<(usize, usize, Vec<String>)>,
}

#[derive(Default)]
struct SeenBox(Seen);

impl std::fmt::Debug for SeenBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seen")
    }
}

impl Watch {
    fn record(&self, f: impl FnOnce(&mut Seen)) {
        if let Some(s) = self.seen.lock().expect("seen").as_mut() {
            f(&mut s.0);
        }
    }
}

fn seq_view(seqs: &[AttnSeq<'_>]) -> SeqView {
    seqs.iter().map(|s| (s.rows.clone(), s.pos0, s.block_table.to_vec())).collect()
}

impl Backend for Watch {
    fn kind(&self) -> DeviceKind {
        self.cpu.kind()
    }
    fn describe(&self) -> String {
        self.cpu.describe()
    }
    fn act_dtype(&self) -> DType {
        self.cpu.act_dtype()
    }
    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: HostBytes) -> shardline_kernels::Result<Tensor> {
        self.cpu.upload_weight(dtype, shape, bytes)
    }
    fn upload_f32(&self, shape: &[usize], data: &[f32]) -> shardline_kernels::Result<Tensor> {
        self.cpu.upload_f32(shape, data)
    }
    fn upload_raw(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> shardline_kernels::Result<Tensor> {
        self.cpu.upload_raw(shape, dtype, bytes)
    }
    fn download_f32(&self, t: &Tensor) -> shardline_kernels::Result<Vec<f32>> {
        self.cpu.download_f32(t)
    }
    fn download_raw(&self, t: &Tensor, dtype: DType) -> shardline_kernels::Result<Vec<u8>> {
        self.cpu.download_raw(t, dtype)
    }
    fn alloc(&self, shape: &[usize]) -> shardline_kernels::Result<Tensor> {
        self.cpu.alloc(shape)
    }
    fn kv_dtype(&self) -> DType {
        self.cpu.kv_dtype()
    }
    fn alloc_kv(&self, shape: &[usize]) -> shardline_kernels::Result<Tensor> {
        self.cpu.alloc_kv(shape)
    }
    fn synchronize(&self) -> shardline_kernels::Result<()> {
        self.cpu.synchronize()
    }
    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> shardline_kernels::Result<()> {
        self.record(|s| s.ids.push(ids.to_vec()));
        self.cpu.embedding(table, ids, out)
    }
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> shardline_kernels::Result<()> {
        self.cpu.rms_norm(x, w, eps, out)
    }
    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> shardline_kernels::Result<()> {
        self.cpu.add_rms_norm(residual, x, w, eps, out)
    }
    fn matmul(&self, x: &Tensor, w: &Tensor, out: &mut Tensor) -> shardline_kernels::Result<()> {
        self.cpu.matmul(x, w, out)
    }
    fn matmul_many(&self, x: &Tensor, outs: &mut [(&Tensor, &mut Tensor)]) -> shardline_kernels::Result<()> {
        self.cpu.matmul_many(x, outs)
    }
    fn matmul_swiglu(
        &self,
        x: &Tensor,
        w: (&Tensor, &Tensor),
        scratch: (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> shardline_kernels::Result<()> {
        self.cpu.matmul_swiglu(x, w, scratch, out)
    }
    fn rope(
        &self,
        x: &mut Tensor,
        positions: &[u32],
        n_heads: usize,
        inv_freq: &Tensor,
        cfg: &RopeConfig,
    ) -> shardline_kernels::Result<()> {
        self.record(|s| s.positions.push(positions.to_vec()));
        self.cpu.rope(x, positions, n_heads, inv_freq, cfg)
    }
    fn rope_table(&self, inv_freq: &[f32]) -> shardline_kernels::Result<Tensor> {
        self.cpu.rope_table(inv_freq)
    }
    fn swiglu(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> shardline_kernels::Result<()> {
        self.cpu.swiglu(gate, up, out)
    }
    fn add(&self, acc: &mut Tensor, x: &Tensor) -> shardline_kernels::Result<()> {
        self.cpu.add(acc, x)
    }
    fn add_bias(&self, x: &mut Tensor, bias: &Tensor) -> shardline_kernels::Result<()> {
        self.cpu.add_bias(x, bias)
    }
    fn copy_rows(
        &self,
        src: &Tensor,
        sr: usize,
        dst: &mut Tensor,
        dr: usize,
        n: usize,
    ) -> shardline_kernels::Result<()> {
        self.cpu.copy_rows(src, sr, dst, dr, n)
    }
    fn kv_store(
        &self,
        kc: &mut Tensor,
        vc: &mut Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> shardline_kernels::Result<()> {
        self.record(|s| s.slots.push(slots.to_vec()));
        self.cpu.kv_store(kc, vc, k, v, slots)
    }
    fn rope_kv_store(
        &self,
        q: &mut Tensor,
        k: &mut Tensor,
        v: &Tensor,
        positions: &[u32],
        heads: (usize, usize),
        inv_freq: &Tensor,
        cfg: &RopeConfig,
        caches: (&mut Tensor, &mut Tensor),
        slots: &[u32],
    ) -> shardline_kernels::Result<()> {
        self.record(|s| {
            s.positions.push(positions.to_vec());
            s.slots.push(slots.to_vec());
        });
        self.cpu.rope_kv_store(q, k, v, positions, heads, inv_freq, cfg, caches, slots)
    }
    fn attention(
        &self,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Tensor,
    ) -> shardline_kernels::Result<()> {
        self.record(|s| s.seqs.push(seq_view(seqs)));
        self.cpu.attention(q, kc, vc, seqs, shape, out)
    }
    fn sample(
        &self,
        logits: &Tensor,
        row: usize,
        params: &SamplingParams,
        position: u64,
        n_top: usize,
    ) -> shardline_kernels::Result<Sampled> {
        self.cpu.sample(logits, row, params, position, n_top)
    }
    fn graph_step(
        &self,
        key: Option<GraphKey>,
        inputs: Option<&StepInputs<'_>>,
        step: &mut dyn FnMut() -> shardline_kernels::Result<()>,
    ) -> shardline_kernels::Result<StepRun> {
        *self.seen.lock().expect("seen") = Some(SeenBox::default());
        let ran = step();
        let seen = self.seen.lock().expect("seen").take().expect("watching").0;
        ran?;
        let mut report = self.report.lock().expect("report");
        let Some(inputs) = inputs.filter(|_| key.is_some()) else {
            report.2.push("a keyed decode step without its inputs".into());
            return Ok(StepRun::Eager);
        };
        report.0 += 1;
        report.1 += seen.seqs.len();
        let n = report.0;
        let mut bad = |what: &str, ok: bool| {
            if !ok {
                report.2.push(format!("step {n}: {what}"));
            }
        };
        bad("layers", !seen.seqs.is_empty() && seen.positions.len() == seen.seqs.len());
        bad(
            "ids",
            seen.ids.iter().all(|ids| Some(&ids[..]) == inputs.ids)
                && seen.ids.len() == usize::from(inputs.ids.is_some()),
        );
        bad("positions", seen.positions.iter().all(|p| p[..] == *inputs.positions));
        bad("slots", seen.slots.iter().all(|s| s[..] == *inputs.slots) && seen.slots.len() == seen.seqs.len());
        bad("seqs", seen.seqs.iter().all(|s| *s == seq_view(inputs.seqs)));
        Ok(StepRun::Eager)
    }
}

/// The inputs a decode step hands a graph backend (`StepInputs`: what a direct replay writes the step's staged
/// arguments from) are exactly the arguments every layer of the step hands its ops: token ids, positions, KV slots
/// and the attention's sequences, for batches across buckets 1–16 with pads, sessions of different block-table
/// lengths, on a first stage (tokens) and a later one (hidden states).
#[test]
fn step_inputs_are_what_every_layer_hands_its_ops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tiny_model(&dir);
    let watch = Arc::new(Watch { cpu: CpuBackend::new(1), seen: Mutex::default(), report: Mutex::default() });
    let backend: Arc<dyn Backend> = watch.clone();
    let n_layers = files.config().n_layers;
    let opts = ShardOptions { kv_budget_bytes: 16 << 20, block_tokens: 16 };
    let load = |a: usize, b: usize| {
        Shard::load(files.weights().as_ref(), LayerRange::new(a, b), backend.clone(), opts.clone()).expect("shard")
    };
    let (whole, back) = (load(0, n_layers), load(1, n_layers));
    whole.force_step_graphs(true);
    back.force_step_graphs(true);
    let vocab = files.config().vocab as u32;
    let sessions = 9;
    // Reservations of 16 to 80 tokens: block tables of one to five blocks; prompts of 3 to 6 tokens.
    let mut kv: Vec<(ShardKv, ShardKv)> = (0..sessions)
        .map(|i| {
            let reserve = 16 * (1 + i % 5);
            let (mut a, b) = (whole.open_session(reserve).expect("session"), back.open_session(reserve).expect("s"));
            let prompt: Vec<u32> = (0..3 + i % 4).map(|j| ((i * 37 + j * 11 + 5) as u32) % vocab).collect();
            whole.forward(&mut a, ShardInput::Tokens(&prompt)).expect("prefill");
            (a, b)
        })
        .collect();
    let hidden = backend.upload_f32(&[1, files.config().hidden], &vec![0.25; files.config().hidden]).expect("h");
    let mut steps = 0;
    for (step, n) in [1usize, 3, 5, 2, 9, 4, 7, 16, 8, 6].into_iter().enumerate() {
        let n = n.min(sessions);
        let chosen: Vec<usize> = (0..n).map(|j| (j + step) % sessions).collect();
        let tokens: Vec<[u32; 1]> = chosen.iter().map(|&i| [((i + step) as u32 * 7 + 1) % vocab]).collect();
        for stage in 0..2 {
            let mut mine: Vec<Option<&mut (ShardKv, ShardKv)>> = kv.iter_mut().map(Some).collect();
            let mut items: Vec<BatchItem<'_>> = chosen
                .iter()
                .zip(&tokens)
                .map(|(&i, t)| {
                    let s = mine[i].take().expect("each session once per step");
                    if stage == 0 {
                        BatchItem { kv: &mut s.0, input: ShardInput::Tokens(t), head: HeadRows::Last }
                    } else {
                        BatchItem { kv: &mut s.1, input: ShardInput::Hidden(&hidden), head: HeadRows::Last }
                    }
                })
                .collect();
            let shard = if stage == 0 { &whole } else { &back };
            let out = shard.forward_batch_stepped(&mut items, shard.layers()).expect("stepped decode");
            assert_eq!(out.len(), n);
            steps += 1;
        }
    }
    let report = watch.report.lock().expect("report");
    assert!(report.2.is_empty(), "{:?}", report.2);
    assert_eq!(report.0, steps, "every step was checked");
    // Every layer of every step: the whole model's layers on the first stage, one fewer on the second.
    assert_eq!(report.1, steps / 2 * (n_layers + n_layers - 1));
}

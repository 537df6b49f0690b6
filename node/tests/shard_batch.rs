//! Batch-size independence of `Shard::forward_batch`: every session of a batch gets bit-for-bit the hidden states and
//! logits it gets when run alone, and so the same greedy tokens, whatever it is batched with (1, 3 or 15 others) and
//! whether its batch mates are prefilling chunks or decoding. The model is cut in two shards so both the hidden
//! states between stages and the logits of the head are compared. The reference is each session run alone through
//! `Shard::forward` (the one-session path), chunk by chunk, with the same chunking.

use std::path::Path;
use std::sync::Arc;

use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType, SamplingParams, Tensor};
use shardline_node::model::{
    Architecture, BatchItem, HeadRows, LayerRange, ModelFiles, Shard, ShardInput, ShardKv, ShardOptions, ShardOutput,
};
use shardline_node::test_models::{TinyDTypes, TinySpec, model_for_tests, write_tiny_gguf};

/// What one session feeds: its prompt in chunks of `chunk` tokens from global step `start`, then `decode` greedy
/// tokens one by one.
#[derive(Clone, Debug)]
struct Script {
    prompt: Vec<u32>,
    chunk: usize,
    start: usize,
    decode: usize,
}

/// Everything one session saw, step by step: the bits of the hidden states between the shards and of the logits.
#[derive(Debug, Default, PartialEq)]
struct Trace {
    hidden: Vec<Vec<u32>>,
    logits: Vec<Vec<u32>>,
    tokens: Vec<u32>,
}

/// A session being driven: its script, its KV caches on both shards, what it has fed.
struct Run {
    script: Script,
    front: ShardKv,
    back: ShardKv,
    fed: usize,
    next: Option<u32>,
    trace: Trace,
}

impl Run {
    fn new(script: Script, front: &Shard, back: &Shard) -> Run {
        let max = script.prompt.len() + script.decode + 1;
        Run {
            script,
            front: front.open_session(max).unwrap(),
            back: back.open_session(max).unwrap(),
            fed: 0,
            next: None,
            trace: Trace::default(),
        }
    }

    /// The tokens of the session's next step, if it has one.
    fn input(&self) -> Option<Vec<u32>> {
        let p = &self.script.prompt;
        if self.fed < p.len() {
            return Some(p[self.fed..(self.fed + self.script.chunk).min(p.len())].to_vec());
        }
        (self.trace.tokens.len() < self.script.decode + 1).then(|| self.next.map(|t| vec![t])).flatten()
    }

    fn is_decoding(&self) -> bool {
        self.fed >= self.script.prompt.len()
    }

    /// Records one step's hidden states and logits; after the prompt, the greedy token feeds the next step.
    fn record(&mut self, b: &dyn Backend, n: usize, hidden: &Tensor, logits: &Tensor, back: &Shard) {
        self.fed += n;
        self.trace.hidden.push(bits(b, hidden));
        self.trace.logits.push(bits(b, logits));
        if self.fed >= self.script.prompt.len() {
            let t = back.sample(logits, &SamplingParams::GREEDY, self.fed as u64, 0).unwrap().token;
            self.trace.tokens.push(t);
            self.next = Some(t);
        }
    }
}

fn bits(b: &dyn Backend, t: &Tensor) -> Vec<u32> {
    b.download_f32(t).unwrap().into_iter().map(f32::to_bits).collect()
}

fn shards(path: &Path, threads: usize, kv: DType) -> (Shard, Shard) {
    let files = ModelFiles::open(path).unwrap();
    let n = files.config().n_layers;
    let m = n / 2;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(threads).with_kv_dtype(kv).unwrap());
    let w = files.weights();
    let opts = ShardOptions { kv_budget_bytes: 64 << 20, block_tokens: 16 };
    let front = Shard::load(w.as_ref(), LayerRange::new(0, m), backend.clone(), opts.clone()).unwrap();
    let back = Shard::load(w.as_ref(), LayerRange::new(m, n), backend, opts).unwrap();
    (front, back)
}

/// One session alone, through the one-session `Shard::forward`.
fn alone(front: &Shard, back: &Shard, script: &Script) -> Trace {
    let b = front.backend().clone();
    let mut run = Run::new(script.clone(), front, back);
    while let Some(input) = run.input() {
        let ShardOutput::Hidden(h) = front.forward(&mut run.front, ShardInput::Tokens(&input)).unwrap() else {
            panic!("the front shard ends before the head")
        };
        let ShardOutput::Logits(l) = back.forward(&mut run.back, ShardInput::Hidden(&h)).unwrap() else {
            panic!("the back shard ends at the head")
        };
        run.record(b.as_ref(), input.len(), &h, &l, back);
    }
    run.trace
}

/// Every session together: at each step, every started session that has an input goes into one batched forward
/// per shard. Returns the traces and how many steps mixed decode rows with prefill chunks.
fn batched(front: &Shard, back: &Shard, scripts: &[Script]) -> (Vec<Trace>, usize) {
    let b = front.backend().clone();
    let mut runs: Vec<Run> = scripts.iter().map(|s| Run::new(s.clone(), front, back)).collect();
    let mut mixed = 0;
    for step in 0.. {
        let inputs: Vec<Option<Vec<u32>>> =
            runs.iter().map(|r| if r.script.start <= step { r.input() } else { None }).collect();
        if inputs.iter().all(Option::is_none) && runs.iter().all(|r| r.script.start <= step) {
            break;
        }
        let active: Vec<usize> = (0..runs.len()).filter(|&i| inputs[i].is_some()).collect();
        if active.is_empty() {
            continue;
        }
        let decoding = active.iter().filter(|&&i| runs[i].is_decoding()).count();
        if decoding > 0 && decoding < active.len() {
            mixed += 1;
        }
        let hidden = {
            let mut items: Vec<BatchItem<'_>> = runs
                .iter_mut()
                .zip(&inputs)
                .filter_map(|(r, inp)| {
                    inp.as_ref().map(|t| BatchItem {
                        kv: &mut r.front,
                        input: ShardInput::Tokens(t),
                        head: HeadRows::Last,
                    })
                })
                .collect();
            front.forward_batch(&mut items, front.layers()).unwrap()
        };
        let hidden: Vec<Tensor> = hidden
            .into_iter()
            .map(|o| match o {
                ShardOutput::Hidden(h) => h,
                ShardOutput::Logits(_) => panic!("the front shard ends before the head"),
            })
            .collect();
        let logits = {
            let mut items: Vec<BatchItem<'_>> = runs
                .iter_mut()
                .zip(&inputs)
                .filter(|(_, inp)| inp.is_some())
                .zip(&hidden)
                .map(|((r, _), h)| BatchItem { kv: &mut r.back, input: ShardInput::Hidden(h), head: HeadRows::Last })
                .collect();
            back.forward_batch(&mut items, back.layers()).unwrap()
        };
        for ((&i, h), l) in active.iter().zip(&hidden).zip(logits) {
            let ShardOutput::Logits(l) = l else { panic!("the back shard ends at the head") };
            assert_eq!(l.rows(), 1, "one row of logits per item");
            let n = inputs[i].as_ref().map_or(0, Vec::len);
            runs[i].record(b.as_ref(), n, h, &l, back);
            // As the stage does after its draw: later batches copy their rows into these buffers, which must not
            // change any bit.
            back.recycle_logits(l);
        }
    }
    (runs.into_iter().map(|r| r.trace).collect(), mixed)
}

/// Session 0 and `others` more: prompts of different lengths, chunks of different sizes, staggered starts, so
/// session 0 decodes while others still prefill and prefills while the first ones decode.
fn scripts(others: usize, vocab: u32, decode: usize) -> Vec<Script> {
    (0..=others)
        .map(|i| {
            let len = 5 + 7 * i % 23;
            let prompt = (0..len).map(|j| ((i * 131 + j * 17 + 7) as u32) % vocab).collect();
            Script { prompt, chunk: 3 + (i % 4) * 5, start: (i * 2) % 7, decode }
        })
        .collect()
}

fn check_model(path: &Path, threads: usize, decode: usize) {
    check_model_kv(path, threads, decode, DType::F32);
}

fn check_model_kv(path: &Path, threads: usize, decode: usize, kv: DType) {
    let (front, back) = shards(path, threads, kv);
    let vocab = front.config().vocab as u32;
    for others in [1, 3, 15] {
        let scripts = scripts(others, vocab.min(300), decode);
        let (traces, mixed) = batched(&front, &back, &scripts);
        assert!(mixed > 0, "{others} others: no step mixed decode rows with prefill chunks");
        for (i, (script, got)) in scripts.iter().zip(&traces).enumerate() {
            let want = alone(&front, &back, script);
            assert_eq!(got.tokens, want.tokens, "{others} others: session {i}'s greedy tokens differ");
            assert_eq!(got.hidden.len(), want.hidden.len());
            for (s, (g, w)) in got.hidden.iter().zip(&want.hidden).enumerate() {
                assert!(g == w, "{others} others: session {i}'s hidden states at step {s} are not bit-identical");
            }
            for (s, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
                assert!(g == w, "{others} others: session {i}'s logits at step {s} are not bit-identical");
            }
        }
        // Nothing is left reserved: every session's KV blocks are back in the pool.
        assert_eq!(front.free_kv_tokens(), front.kv_capacity_tokens());
    }
}

fn tiny(arch: Architecture, dtypes: TinyDTypes) -> TinySpec {
    let explicit_head_dim = (arch == Architecture::Qwen3).then_some(32);
    TinySpec { arch, n_layers: 4, tied: arch != Architecture::Llama, explicit_head_dim, dtypes, ..TinySpec::default() }
}

#[test]
fn tiny_models_give_each_session_its_solo_bits_in_any_batch() {
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("llama f32", tiny(Architecture::Llama, TinyDTypes::all(DType::F32))),
        ("llama q4_1", tiny(Architecture::Llama, TinyDTypes::like_llama_cpp(DType::Q4_1))),
        ("llama q8_0", tiny(Architecture::Llama, TinyDTypes::all(DType::Q8_0))),
        ("qwen2 q4_0", tiny(Architecture::Qwen2, TinyDTypes::like_llama_cpp(DType::Q4_0))),
        ("qwen3 f16", tiny(Architecture::Qwen3, TinyDTypes::all(DType::F16))),
        ("qwen3 q4_1", tiny(Architecture::Qwen3, TinyDTypes::like_llama_cpp(DType::Q4_1))),
    ] {
        let path = dir.path().join(format!("{}.gguf", name.replace(' ', "-")));
        write_tiny_gguf(&spec, &path).unwrap();
        eprintln!("{name}");
        // Two threads: the work splits differently with the batch, and must not change a bit.
        check_model(&path, 2, 6);
    }
}

#[test]
fn smollm2_gives_each_session_its_solo_bits_in_any_batch() {
    let Some(path) = model_for_tests("smollm2_gives_each_session_its_solo_bits_in_any_batch") else { return };
    check_model(&path, 2, 4);
}

/// With an f16 KV cache (`CpuBackend::with_kv_dtype`) too: batch-size independence, and a session run alone gives
/// the same bits on 1 and 3 threads; the cache really is f16 (half the bytes per token of an f32 one).
fn check_f16_kv(path: &Path, decode: usize) {
    check_model_kv(path, 2, decode, DType::F16);
    let vocab = {
        let (front, _) = shards(path, 1, DType::F16);
        front.config().vocab as u32
    };
    let script = &scripts(1, vocab.min(300), decode)[0];
    let (f1, b1) = shards(path, 1, DType::F16);
    let (f3, b3) = shards(path, 3, DType::F16);
    assert_eq!(alone(&f1, &b1, script), alone(&f3, &b3, script), "f16 KV cache: 1 and 3 threads differ");
    let (f32_front, _) = shards(path, 1, DType::F32);
    // The same byte budget holds twice the tokens (the block count is rounded down in each case).
    let (c16, c32) = (f1.kv_capacity_tokens(), f32_front.kv_capacity_tokens());
    assert!(c16 >= 2 * c32 && c16 < 2 * c32 + 32, "f16 cache: {c16} tokens, f32: {c32}");
}

#[test]
fn tiny_models_with_an_f16_kv_cache_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in [
        ("llama q4_1", tiny(Architecture::Llama, TinyDTypes::like_llama_cpp(DType::Q4_1))),
        ("qwen3 f16", tiny(Architecture::Qwen3, TinyDTypes::all(DType::F16))),
    ] {
        let path = dir.path().join(format!("{}.gguf", name.replace(' ', "-")));
        write_tiny_gguf(&spec, &path).unwrap();
        eprintln!("{name}");
        check_f16_kv(&path, 6);
    }
}

#[test]
fn smollm2_with_an_f16_kv_cache_is_deterministic() {
    let Some(path) = model_for_tests("smollm2_with_an_f16_kv_cache_is_deterministic") else { return };
    check_f16_kv(&path, 4);
}

#[test]
fn a_bad_item_fails_the_batch_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&tiny(Architecture::Llama, TinyDTypes::all(DType::F32)), &path).unwrap();
    let (front, _) = shards(&path, 1, DType::F32);
    let mut a = front.open_session(8).unwrap();
    let mut b = front.open_session(8).unwrap();
    let too_long = vec![1u32; 20];
    let mut items = vec![
        BatchItem { kv: &mut a, input: ShardInput::Tokens(&[1, 2, 3]), head: HeadRows::Last },
        BatchItem { kv: &mut b, input: ShardInput::Tokens(&too_long), head: HeadRows::Last },
    ];
    assert!(front.forward_batch(&mut items, front.layers()).is_err());
    drop(items);
    assert_eq!((a.len(), b.len()), (0, 0), "a refused batch leaves every session's positions as they were");
}

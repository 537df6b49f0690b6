//! Tiny models for tests (Llama, Qwen2, Qwen3 block layouts), written both as a GGUF file and as a Hugging Face
//! directory holding the same numbers.
//!
//! Weights are drawn in f32 from a seeded SplitMix64 generator (normal, std 0.02..0.1 for matrices, norms around
//! 1.0), quantised for GGUF when the spec asks for a quantised dtype, and the Hugging Face side stores the
//! dequantised values (f32; or the same f16/bf16 bits when the dtype is exact), so both formats hold identical
//! numbers. For Llama, GGUF Q/K rows are permuted to llama.cpp's interleaved RoPE layout exactly as
//! `convert_hf_to_gguf.py` does; Qwen GGUF files, like every Hugging Face directory, keep them unpermuted. Both carry a complete byte-level BPE tokenizer (256 byte
//! tokens, a few merges, ChatML specials and template), so the tiny GGUF is a complete model.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use shardline_kernels::{DType, Llama3Scaling, RopeConfig, RopeStyle};

use crate::error::{ModelError, Result};
use crate::formats::gguf::GgufValue;
use crate::formats::gguf_writer::GgufWriter;
use crate::formats::hf::{self, canonical_to_hf};
use crate::model::arch::Architecture;
use crate::model::config::ModelConfig;

/// ChatML, as SmolLM2 and Qwen use it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' \
}}{% endif %}";

/// Special tokens at ids 0, 1, 2 (SmolLM2's order).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny vocabulary, in rank order, in byte-level characters (`Ġ` is a space). With them
/// `"hello world"` encodes to the two tokens `hello`, `Ġworld`.
pub const MERGES: [&str; 16] = [
    "Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n", "r e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d",
    "Ġwor ld",
];

/// Id of the first of the 256 byte tokens; byte `b` is token `BYTE_TOKENS_START + b`.
pub const BYTE_TOKENS_START: u32 = SPECIAL_TOKENS.len() as u32;

/// Smallest vocabulary: specials, bytes and merges. Larger vocabularies are filled with `<|reserved_N|>` specials.
pub const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256 + MERGES.len();

/// llama.cpp token types.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_CONTROL: i32 = 3;

/// Storage dtype per tensor group. Quantised dtypes need the inner (input) dimension to be a multiple of 32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TinyDTypes {
    pub embeddings: DType,
    pub attention: DType,
    pub ffn: DType,
    pub norms: DType,
    pub output: DType,
}

impl TinyDTypes {
    pub const fn all(dtype: DType) -> Self {
        TinyDTypes { embeddings: dtype, attention: dtype, ffn: dtype, norms: dtype, output: dtype }
    }

    /// Like SmolLM2's Q4_1 file: Q8_0 embeddings, `blocks` for the layer matrices and the head, F32 norms.
    pub const fn like_llama_cpp(blocks: DType) -> Self {
        TinyDTypes { embeddings: DType::Q8_0, attention: blocks, ffn: blocks, norms: DType::F32, output: blocks }
    }
}

/// Shape and storage of a tiny model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinySpec {
    /// Block layout and file names: `llama`, `qwen2` or `qwen3` metadata and the tensors that layout has.
    pub arch: Architecture,
    pub n_layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Head size when it is not `hidden / n_heads` (Qwen3 style: `n_heads · head_dim` may differ from `hidden`).
    pub explicit_head_dim: Option<usize>,
    /// At least [`MIN_VOCAB`].
    pub vocab: usize,
    /// Context length in tokens.
    pub context: usize,
    /// No `output.weight` / `lm_head.weight`: the head reuses the embeddings.
    pub tied: bool,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Llama 3 RoPE scaling: `rope_scaling` in `config.json`, `rope_freqs.weight` in GGUF.
    pub llama3: Option<Llama3Scaling>,
    pub dtypes: TinyDTypes,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            arch: Architecture::Llama,
            n_layers: 2,
            hidden: 64,
            ffn: 128,
            n_heads: 4,
            n_kv_heads: 2,
            explicit_head_dim: None,
            vocab: 288,
            context: 256,
            tied: false,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            llama3: None,
            dtypes: TinyDTypes::all(DType::F32),
            seed: 0x5eed,
        }
    }
}

/// Where a tensor sits in the model, which decides its dtype and initial scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Embeddings,
    Norm,
    /// Q/K/V biases: stored like the norms (F32 in llama.cpp's files), drawn around 0 with a large spread, as
    /// Qwen2's are.
    Bias,
    Attention,
    Ffn,
    Output,
}

impl TinySpec {
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim.unwrap_or(self.hidden / self.n_heads.max(1))
    }

    /// The architecture name the files carry (`general.architecture`, `model_type`).
    pub fn arch_name(&self) -> String {
        self.arch.to_string()
    }

    fn dtype(&self, role: Role) -> DType {
        match role {
            Role::Embeddings => self.dtypes.embeddings,
            Role::Norm | Role::Bias => self.dtypes.norms,
            Role::Attention => self.dtypes.attention,
            Role::Ffn => self.dtypes.ffn,
            Role::Output => self.dtypes.output,
        }
    }

    fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Invalid(format!("tiny model spec: {m}")));
        if [self.n_layers, self.hidden, self.ffn, self.n_heads, self.n_kv_heads, self.context].contains(&0) {
            return fail("every size must be positive".into());
        }
        if (self.explicit_head_dim.is_none() && !self.hidden.is_multiple_of(self.n_heads))
            || self.head_dim() == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
            || !self.head_dim().is_multiple_of(2)
        {
            return fail(format!(
                "{} heads / {} KV heads do not fit hidden {}",
                self.n_heads, self.n_kv_heads, self.hidden
            ));
        }
        if self.vocab < MIN_VOCAB {
            return fail(format!("vocab {} is below the tokenizer's {MIN_VOCAB} tokens", self.vocab));
        }
        for (name, shape, role, _) in self.tensors() {
            let dtype = self.dtype(role);
            if dtype.is_quantized() && shape.last().is_some_and(|&c| c % dtype.block_elems() != 0) {
                return fail(format!(
                    "{name} {shape:?} cannot be stored as {dtype}: inner dimension not a multiple of 32"
                ));
            }
        }
        Ok(())
    }

    /// Canonical name, row-major shape, role, and whether it is a Q/K matrix (with its head count).
    fn tensors(&self) -> Vec<(String, Vec<usize>, Role, Option<usize>)> {
        let (h, hd) = (self.hidden, self.head_dim());
        let layout = self.arch.layout();
        // Only Llama's GGUF rows are permuted (see `Architecture::gguf_rope_style`).
        let permuted = |heads: usize| (self.arch.gguf_rope_style() == RopeStyle::Interleaved).then_some(heads);
        let mut out = vec![("token_embd.weight".to_owned(), vec![self.vocab, h], Role::Embeddings, None)];
        for i in 0..self.n_layers {
            let b = |n: &str| format!("blk.{i}.{n}.weight");
            let bias = |n: &str| format!("blk.{i}.{n}.bias");
            out.extend([
                (b("attn_norm"), vec![h], Role::Norm, None),
                (b("attn_q"), vec![self.n_heads * hd, h], Role::Attention, permuted(self.n_heads)),
                (b("attn_k"), vec![self.n_kv_heads * hd, h], Role::Attention, permuted(self.n_kv_heads)),
                (b("attn_v"), vec![self.n_kv_heads * hd, h], Role::Attention, None),
            ]);
            if layout.qkv_bias {
                out.extend([
                    (bias("attn_q"), vec![self.n_heads * hd], Role::Bias, None),
                    (bias("attn_k"), vec![self.n_kv_heads * hd], Role::Bias, None),
                    (bias("attn_v"), vec![self.n_kv_heads * hd], Role::Bias, None),
                ]);
            }
            if layout.qk_norm {
                out.extend([
                    (b("attn_q_norm"), vec![hd], Role::Norm, None),
                    (b("attn_k_norm"), vec![hd], Role::Norm, None),
                ]);
            }
            out.extend([
                (b("attn_output"), vec![h, self.n_heads * hd], Role::Attention, None),
                (b("ffn_norm"), vec![h], Role::Norm, None),
                (b("ffn_gate"), vec![self.ffn, h], Role::Ffn, None),
                (b("ffn_up"), vec![self.ffn, h], Role::Ffn, None),
                (b("ffn_down"), vec![h, self.ffn], Role::Ffn, None),
            ]);
        }
        out.push(("output_norm.weight".to_owned(), vec![h], Role::Norm, None));
        if !self.tied {
            out.push(("output.weight".to_owned(), vec![self.vocab, h], Role::Output, None));
        }
        out
    }

    fn rope(&self, style: RopeStyle, llama3: Option<Llama3Scaling>) -> RopeConfig {
        let hd = self.head_dim();
        RopeConfig { head_dim: hd, rotary_dim: hd, theta: self.rope_theta, style, llama3, linear_factor: 1.0 }
    }

    /// The configuration a reader should find in the tiny GGUF file.
    pub fn gguf_config(&self) -> ModelConfig {
        ModelConfig {
            rope: self.rope(self.arch.gguf_rope_style(), None),
            rope_freq_factors: self.llama3.map(|s| llama3_freq_factors(self.rope_theta, self.head_dim(), &s)),
            ..self.hf_config()
        }
    }

    /// The configuration a reader should find in the tiny Hugging Face directory.
    pub fn hf_config(&self) -> ModelConfig {
        ModelConfig {
            arch: self.arch_name(),
            architecture: self.arch,
            n_layers: self.n_layers,
            hidden: self.hidden,
            ffn: self.ffn,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim(),
            vocab: self.vocab,
            context_length: self.context,
            rms_eps: self.rms_eps,
            rope: self.rope(RopeStyle::Neox, self.llama3),
            rope_freq_factors: None,
            tied_embeddings: self.tied,
        }
    }
}

/// llama.cpp's `rope_freqs.weight` for Llama 3 scaling (`LlamaModel.generate_extra_tensors` in
/// `convert_hf_to_gguf.py`): the divisor of each inverse frequency.
pub fn llama3_freq_factors(theta: f32, head_dim: usize, s: &Llama3Scaling) -> Vec<f32> {
    let low_wavelen = s.original_max_position as f64 / s.low_freq_factor as f64;
    let high_wavelen = s.original_max_position as f64 / s.high_freq_factor as f64;
    (0..head_dim / 2)
        .map(|i| {
            // The converter computes the base frequencies in float32.
            let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            let factor = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                s.factor as f64
            } else {
                let smooth = (s.original_max_position as f64 / wavelen - s.low_freq_factor as f64)
                    / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                1.0 / ((1.0 - smooth) / s.factor as f64 + smooth)
            };
            factor as f32
        })
        .collect()
}

/// llama.cpp's `permute(w, n_head)` on the rows of a `[rows, cols]` Q or K matrix: within each head, row
/// `s * head_dim/2 + j` (NeoX halves) moves to row `2j + s` (interleaved pairs). For K, `n_head` is the KV head
/// count.
pub fn permute_qk_rows<T: Copy>(w: &[T], n_head: usize, cols: usize) -> Vec<T> {
    map_qk_rows(w, n_head, cols, false)
}

/// The inverse of [`permute_qk_rows`]: from llama.cpp's interleaved layout back to Hugging Face's.
pub fn unpermute_qk_rows<T: Copy>(w: &[T], n_head: usize, cols: usize) -> Vec<T> {
    map_qk_rows(w, n_head, cols, true)
}

fn map_qk_rows<T: Copy>(w: &[T], n_head: usize, cols: usize, inverse: bool) -> Vec<T> {
    let rows = w.len() / cols;
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = w.to_vec();
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..half {
                let neox = h * head_dim + s * half + j;
                let inter = h * head_dim + 2 * j + s;
                let (from, to) = if inverse { (inter, neox) } else { (neox, inter) };
                out[to * cols..(to + 1) * cols].copy_from_slice(&w[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Encodes f32 values as `dtype` in ggml's byte layout with the kernels crate's reference quantisers (ggml's
/// `quantize_row_*_ref`). Quantised dtypes need a whole number of 32-element blocks.
pub fn quantize(dtype: DType, x: &[f32]) -> Result<Vec<u8>> {
    Ok(shardline_kernels::quant::quantize(dtype, x)?)
}

/// Decodes `dtype` bytes in ggml's layout to f32 (`d·q` for Q8_0, `d·(q−8)` for Q4_0, `d·q + m` for Q4_1).
pub fn dequantize(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(dtype.block_bytes()) {
        return Err(ModelError::Invalid(format!("{} bytes are not whole {dtype} blocks", bytes.len())));
    }
    let mut out = vec![0.0; bytes.len() / dtype.block_bytes() * dtype.block_elems()];
    shardline_kernels::quant::dequantize(dtype, bytes, &mut out)?;
    Ok(out)
}

/// A seeded SplitMix64 stream (the same mixer as the sampler's counter-based generator).
struct SplitMix(shardline_kernels::rng::SplitMix64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in the open interval (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal by Box-Muller.
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A per-tensor stream, so every tensor's values depend only on the seed and its name.
fn stream(seed: u64, name: &str) -> SplitMix {
    // FNV-1a of the name.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    SplitMix(shardline_kernels::rng::SplitMix64::new(shardline_kernels::rng::mix64(seed ^ h)))
}

/// One tensor of a tiny model, in both formats.
#[derive(Clone, Debug)]
pub struct TinyTensor {
    /// Canonical (GGUF) name.
    pub name: String,
    /// Row-major shape (`[out, in]`), the same in both formats.
    pub shape: Vec<usize>,
    /// Values in the Hugging Face layout (Q/K unpermuted), after quantisation and dequantisation: exactly what
    /// both files hold.
    pub values: Vec<f32>,
    pub gguf_dtype: DType,
    /// GGUF data: Q/K rows permuted, encoded as `gguf_dtype`.
    pub gguf_bytes: Vec<u8>,
    /// F32 for quantised GGUF dtypes, otherwise the GGUF dtype.
    pub hf_dtype: DType,
    pub hf_bytes: Vec<u8>,
}

/// Draws every tensor of the model (canonical order: embeddings, layers, final norm, head), without the GGUF-only
/// `rope_freqs.weight`.
pub fn tiny_tensors(spec: &TinySpec) -> Result<Vec<TinyTensor>> {
    spec.validate()?;
    spec.tensors()
        .into_iter()
        .map(|(name, shape, role, qk_heads)| {
            let cols = *shape.last().unwrap_or(&1);
            let n: usize = shape.iter().product();
            let mut rng = stream(spec.seed, &name);
            let (mean, std) = match role {
                Role::Norm => (1.0, 0.05),
                Role::Bias => (0.0, 0.5),
                Role::Embeddings => (0.0, 0.1),
                _ => (0.0, (1.0 / (cols as f64).sqrt()).clamp(0.02, 0.1)),
            };
            let drawn: Vec<f32> = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
            let dtype = spec.dtype(role);
            let to_gguf = |v: &[f32]| match qk_heads {
                Some(heads) => permute_qk_rows(v, heads, cols),
                None => v.to_vec(),
            };
            let gguf_bytes = quantize(dtype, &to_gguf(&drawn))?;
            // Dequantise what GGUF stores and bring it back to the Hugging Face layout.
            let stored = dequantize(dtype, &gguf_bytes)?;
            let values = match qk_heads {
                Some(heads) => unpermute_qk_rows(&stored, heads, cols),
                None => stored,
            };
            let hf_dtype = if dtype.is_quantized() { DType::F32 } else { dtype };
            let hf_bytes = quantize(hf_dtype, &values)?;
            Ok(TinyTensor { name, shape, values, gguf_dtype: dtype, gguf_bytes, hf_dtype, hf_bytes })
        })
        .collect()
}

/// The tiny byte-level BPE vocabulary in GGUF terms.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyVocab {
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in rank order.
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    pub pad: u32,
}

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte in byte-level BPE.
pub fn byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    if printable(b) {
        return char::from(b);
    }
    // Non-printable bytes get 256, 257, ... in byte order.
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// The vocabulary of `vocab_size` tokens: [`SPECIAL_TOKENS`], the 256 byte tokens, the [`MERGES`] results, then
/// `<|reserved_N|>` specials up to the size.
pub fn tiny_vocab(vocab_size: usize) -> Result<TinyVocab> {
    if vocab_size < MIN_VOCAB {
        return Err(ModelError::Invalid(format!("vocab {vocab_size} is below {MIN_VOCAB}")));
    }
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    let mut token_types = vec![TOKEN_TYPE_CONTROL; SPECIAL_TOKENS.len()];
    tokens.extend((0..=255u8).map(|b| byte_to_unicode(b).to_string()));
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    token_types.resize(tokens.len(), TOKEN_TYPE_NORMAL);
    for i in 0..vocab_size - tokens.len() {
        tokens.push(format!("<|reserved_{i}|>"));
        token_types.push(TOKEN_TYPE_CONTROL);
    }
    Ok(TinyVocab {
        tokens,
        token_types,
        merges: MERGES.iter().map(|m| m.to_string()).collect(),
        bos: 1,
        eos: 2,
        unk: 0,
        pad: 2,
    })
}

/// Writes the tiny model as a GGUF file: `{arch}.*` metadata, tokenizer metadata and chat template, and the
/// tensors. The pre-tokenizer is `qwen2` for the Qwen architectures and `gpt-2` for Llama.
pub fn write_tiny_gguf(spec: &TinySpec, path: impl AsRef<Path>) -> Result<()> {
    let tensors = tiny_tensors(spec)?;
    let vocab = tiny_vocab(spec.vocab)?;
    let mut w = GgufWriter::new();
    let u = |v: usize| v as u32;
    let arch = spec.arch_name();
    let k = |name: &str| format!("{arch}.{name}");
    let pre = match spec.arch {
        Architecture::Llama => "gpt-2",
        Architecture::Qwen2 | Architecture::Qwen3 => "qwen2",
    };
    w.add("general.architecture", arch.as_str())?
        .add("general.name", "shardline tiny test model")?
        .add(&k("block_count"), u(spec.n_layers))?
        .add(&k("context_length"), u(spec.context))?
        .add(&k("embedding_length"), u(spec.hidden))?
        .add(&k("feed_forward_length"), u(spec.ffn))?
        .add(&k("attention.head_count"), u(spec.n_heads))?
        .add(&k("attention.head_count_kv"), u(spec.n_kv_heads))?
        .add(&k("rope.freq_base"), spec.rope_theta)?
        .add(&k("attention.layer_norm_rms_epsilon"), spec.rms_eps)?
        .add(&k("rope.dimension_count"), u(spec.head_dim()))?
        .add(&k("vocab_size"), u(spec.vocab))?;
    if spec.explicit_head_dim.is_some() {
        w.add(&k("attention.key_length"), u(spec.head_dim()))?.add(&k("attention.value_length"), u(spec.head_dim()))?;
    }
    w.add("tokenizer.ggml.model", "gpt2")?
        .add("tokenizer.ggml.pre", pre)?
        .add("tokenizer.ggml.tokens", GgufValue::from_strs(&vocab.tokens))?
        .add("tokenizer.ggml.token_type", vocab.token_types.clone())?
        .add("tokenizer.ggml.merges", GgufValue::from_strs(&vocab.merges))?
        .add("tokenizer.ggml.bos_token_id", vocab.bos)?
        .add("tokenizer.ggml.eos_token_id", vocab.eos)?
        .add("tokenizer.ggml.unknown_token_id", vocab.unk)?
        .add("tokenizer.ggml.padding_token_id", vocab.pad)?
        .add("tokenizer.ggml.add_bos_token", false)?
        .add("tokenizer.ggml.add_space_prefix", false)?
        .add("tokenizer.chat_template", CHATML_TEMPLATE)?;
    for t in tensors {
        w.add_tensor(&t.name, t.gguf_dtype, &t.shape, t.gguf_bytes)?;
    }
    if let Some(s) = spec.llama3 {
        let factors = llama3_freq_factors(spec.rope_theta, spec.head_dim(), &s);
        w.add_tensor("rope_freqs.weight", DType::F32, &[factors.len()], quantize(DType::F32, &factors)?)?;
    }
    w.write(path)
}

/// Writes the tiny model as a Hugging Face directory with one `model.safetensors`.
pub fn write_tiny_hf(spec: &TinySpec, dir: impl AsRef<Path>) -> Result<()> {
    write_tiny_hf_sharded(spec, dir, 1)
}

/// Writes the tiny model as a Hugging Face directory; with `shards > 1` the tensors are split over
/// `model-0000k-of-0000n.safetensors` files listed by `model.safetensors.index.json`.
pub fn write_tiny_hf_sharded(spec: &TinySpec, dir: impl AsRef<Path>, shards: usize) -> Result<()> {
    let dir = dir.as_ref();
    let tensors = tiny_tensors(spec)?;
    if shards == 0 || shards > tensors.len() {
        return Err(ModelError::Invalid(format!("{shards} shards for {} tensors", tensors.len())));
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.display().to_string(), source })?;

    write_json(&dir.join(hf::CONFIG_FILE), &hf_config_json(spec))?;
    write_tokenizer_files(spec, dir)?;

    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (k, group) in tensors.chunks(per_shard).enumerate() {
        let file = if shards == 1 {
            hf::SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        let mut views = Vec::with_capacity(group.len());
        for t in group {
            let hf_name = canonical_to_hf(&t.name)
                .ok_or_else(|| ModelError::Invalid(format!("{} has no Hugging Face name", t.name)))?;
            let dtype = match t.hf_dtype {
                DType::F16 => ::safetensors::Dtype::F16,
                DType::BF16 => ::safetensors::Dtype::BF16,
                _ => ::safetensors::Dtype::F32,
            };
            let view = ::safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.hf_bytes)
                .map_err(|e| ModelError::Invalid(format!("{hf_name}: {e}")))?;
            weight_map.insert(hf_name.clone(), file.clone());
            views.push((hf_name, view));
        }
        let path = dir.join(&file);
        ::safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| ModelError::Invalid(format!("writing {}: {e}", path.display())))?;
    }
    if shards > 1 {
        let total: usize = tensors.iter().map(|t| t.hf_bytes.len()).sum();
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&dir.join(hf::INDEX_FILE), &index)?;
    }
    Ok(())
}

fn hf_config_json(spec: &TinySpec) -> serde_json::Value {
    let rope_scaling = spec.llama3.map(|s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        })
    });
    let (class, extra) = match spec.arch {
        Architecture::Llama => ("LlamaForCausalLM", json!({ "attention_bias": false, "mlp_bias": false })),
        // Qwen configs carry a window they do not use; a reader must not cap the context at it.
        Architecture::Qwen2 => (
            "Qwen2ForCausalLM",
            json!({ "use_sliding_window": false, "sliding_window": 4,
            "max_window_layers": spec.n_layers }),
        ),
        Architecture::Qwen3 => (
            "Qwen3ForCausalLM",
            json!({ "attention_bias": false, "use_sliding_window": false,
            "sliding_window": null, "max_window_layers": spec.n_layers }),
        ),
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": spec.arch_name(),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_attention_heads": spec.n_heads,
        "num_hidden_layers": spec.n_layers,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": spec.context,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": spec.tied,
        "vocab_size": spec.vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config
}

/// `tokenizer.json` (built with the `tokenizers` crate: byte-level BPE with the GPT-2 split regex) and
/// `tokenizer_config.json` (specials, no BOS, the ChatML template).
fn write_tokenizer_files(spec: &TinySpec, dir: &Path) -> Result<()> {
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    let vocab = tiny_vocab(spec.vocab)?;
    let tok_err = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
    let map: Vocab = vocab.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = vocab
        .merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ModelError::Tokenizer("merge without a space".into()))?;
    let bpe = BPE::builder().vocab_and_merges(map, merges).build().map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
    let specials: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, ty)| **ty == TOKEN_TYPE_CONTROL)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    tokenizer.save(dir.join("tokenizer.json"), true).map_err(tok_err)?;

    let added: serde_json::Map<String, serde_json::Value> = vocab
        .tokens
        .iter()
        .enumerate()
        .filter(|&(i, _)| vocab.token_types[i] == TOKEN_TYPE_CONTROL)
        .map(|(i, t)| {
            let entry = json!({ "content": t, "lstrip": false, "normalized": false, "rstrip": false,
                "single_word": false, "special": true });
            (i.to_string(), entry)
        })
        .collect();
    let name = |id: u32| vocab.tokens[id as usize].clone();
    let config = json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": name(vocab.bos),
        "eos_token": name(vocab.eos),
        "unk_token": name(vocab.unk),
        "pad_token": name(vocab.pad),
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": spec.context,
        "tokenizer_class": "GPT2Tokenizer",
    });
    write_json(&dir.join("tokenizer_config.json"), &config)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Invalid(e.to_string()))?;
    std::fs::write(path, text).map_err(|source| ModelError::Io { path: path.display().to_string(), source })
}

/// For tests that need the real default model: its path, or `None` after printing that the test is skipped.
/// With `SHARDLINE_REQUIRE_MODEL=1` (set by CI, which fetches the model) a missing model fails the test instead.
pub fn model_for_tests(test: &str) -> Option<std::path::PathBuf> {
    match crate::default_model::locate_default_model() {
        Ok(p) => Some(p),
        Err(why) => {
            if std::env::var("SHARDLINE_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
                panic!("{test}: SHARDLINE_REQUIRE_MODEL=1 but {why}");
            }
            eprintln!("skipped {test}: {why}");
            None
        }
    }
}

/// The llama.cpp quantisation presets `scripts/make-presets` makes from the default model, in its order.
pub const PRESETS: [&str; 16] = [
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q4_1", "Q5_0",
    "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS",
];

/// Where `scripts/make-presets` writes the default model quantised with `preset`.
pub fn preset_path(preset: &str) -> std::path::PathBuf {
    crate::default_model::cache_dir().join("presets").join(format!("SmolLM2-135M-Instruct.{preset}.gguf"))
}

/// Whether `SHARDLINE_REQUIRE_PRESETS` makes a missing `preset` a failure: `1` requires every preset, a list
/// (`Q4_K_M,Q6_K`, commas or spaces) requires those.
pub fn preset_required(preset: &str) -> bool {
    std::env::var("SHARDLINE_REQUIRE_PRESETS")
        .is_ok_and(|v| v.trim() == "1" || v.split([',', ' ']).any(|p| p.trim().eq_ignore_ascii_case(preset)))
}

/// The preset file if `scripts/make-presets` made it; otherwise prints that `test` was skipped and why, or panics
/// when the preset is required (`SHARDLINE_REQUIRE_PRESETS`).
pub fn preset_for_tests(test: &str, preset: &str) -> Option<std::path::PathBuf> {
    let path = preset_path(preset);
    if path.is_file() {
        return Some(path);
    }
    let why = format!("{} is absent; `scripts/make-presets --presets {preset}` makes it", path.display());
    assert!(!preset_required(preset), "{test}: SHARDLINE_REQUIRE_PRESETS names {preset} but {why}");
    eprintln!("skipped {test} on {preset}: {why}");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn permutation_matches_llama_cpp_on_one_head() {
        // numpy: w.reshape(1, 2, 2, 1).swapaxes(1, 2).reshape(4, 1) on rows [0, 1, 2, 3] gives [0, 2, 1, 3].
        assert_eq!(permute_qk_rows(&[0, 1, 2, 3], 1, 1), vec![0, 2, 1, 3]);
        // Two heads of 6 rows: each head's halves [a0 a1 a2 | b0 b1 b2] become [a0 b0 a1 b1 a2 b2].
        let rows: Vec<u32> = (0..12).collect();
        assert_eq!(permute_qk_rows(&rows, 2, 1), vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        let w: Vec<u32> = (0..12 * 3).collect();
        assert_eq!(unpermute_qk_rows(&permute_qk_rows(&w, 2, 3), 2, 3), w);
    }

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        assert_eq!(byte_to_unicode(b' '), 'Ġ');
        assert_eq!(byte_to_unicode(b'\n'), 'Ċ');
        assert_eq!(byte_to_unicode(b'a'), 'a');
        assert_eq!(byte_to_unicode(0), 'Ā');
        assert_eq!(byte_to_unicode(0xad), 'Ń');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_to_unicode).collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn quantisers_reproduce_hand_computed_blocks() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        // Q8_0: d = 16/127, q = round(x / d).
        let q8 = quantize(DType::Q8_0, &x).unwrap();
        assert_eq!(f16::from_le_bytes([q8[0], q8[1]]), f16::from_f32(16.0 / 127.0));
        assert_eq!(q8[2] as i8, -127);
        assert_eq!(q8[2 + 16] as i8, 0);
        // Q4_0: the largest magnitude is -16, d = 2, q = x / 2 + 8.5 truncated: -16 → 0, 15 → 15 (clamped).
        let q4 = quantize(DType::Q4_0, &x).unwrap();
        assert_eq!(f16::from_le_bytes([q4[0], q4[1]]).to_f32(), 2.0);
        assert_eq!(q4[2] & 0x0f, 0);
        assert_eq!(q4[2 + 15] >> 4, 15);
        let back = dequantize(DType::Q4_0, &q4).unwrap();
        assert_eq!(back[0], -16.0);
        // Q4_1: min -16, d = 31/15; x = min is exact.
        let q41 = quantize(DType::Q4_1, &x).unwrap();
        let back = dequantize(DType::Q4_1, &q41).unwrap();
        assert_eq!(back[0], -16.0);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 31.0 / 15.0 / 2.0 + 1e-2, "{a} vs {b}");
        }
    }
}

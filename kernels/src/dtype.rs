/// Element types of weights and activations. Quantised types are stored in blocks along the last (innermost,
/// contiguous) dimension — 32 elements, or 256 for the "super-block" formats (K-quants, IQ4_XS) — in exactly the byte
/// layout of GGUF/ggml so memory-mapped files are used as they are. `docs/REFERENCE.md` (quantisation formats) lists
/// what each one holds.
// ggml's names (Q4_K, IQ4_XS), which users and files know them by.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 × i8 with one f16 scale: 34 bytes per block.
    Q8_0,
    /// 32 × 4-bit with one f16 scale, value = d·(q−8): 18 bytes per block.
    Q4_0,
    /// 32 × 4-bit with f16 scale and minimum, value = d·q + m: 20 bytes per block.
    Q4_1,
    /// 32 × 5-bit with one f16 scale, value = d·(q−16): 22 bytes per block.
    Q5_0,
    /// 32 × 5-bit with f16 scale and minimum, value = d·q + m: 24 bytes per block.
    Q5_1,
    /// 32 × 4-bit indices into a fixed non-linear table of 16 i8 values, one f16 scale: 18 bytes per block.
    IQ4_NL,
    /// 256 × 2-bit in 16 groups of 16 with 4-bit scales and minimums, f16 super-scales: 84 bytes per block.
    Q2_K,
    /// 256 × 3-bit in 16 groups of 16 with signed 6-bit scales, one f16 super-scale: 110 bytes per block.
    Q3_K,
    /// 256 × 4-bit in 8 groups of 32 with 6-bit scales and minimums, f16 super-scales: 144 bytes per block.
    Q4_K,
    /// 256 × 5-bit in 8 groups of 32 with 6-bit scales and minimums, f16 super-scales: 176 bytes per block.
    Q5_K,
    /// 256 × 6-bit in 16 groups of 16 with i8 scales, one f16 super-scale: 210 bytes per block.
    Q6_K,
    /// 256 × 4-bit table indices (as IQ4_NL) in 8 groups of 32 with signed 6-bit scales: 136 bytes per block.
    IQ4_XS,
}

impl DType {
    pub const ALL: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::IQ4_NL,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::IQ4_XS,
    ];

    /// The types [`crate::quant::quantize`] can write (bit for bit as ggml's reference quantisers). The others are
    /// read from files only: llama.cpp's quantisers for them search scales iteratively and are not reproduced here.
    pub const ENCODABLE: [DType; 8] =
        [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1];

    /// Elements per storage block (1 for plain floats).
    pub const fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => 32,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => 256,
        }
    }

    /// Bytes per storage block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 | DType::IQ4_NL => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_XS => 136,
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Whether the type is a 256-value super-block format, multiplied against activations quantised to Q8_K.
    pub const fn is_super_block(self) -> bool {
        self.block_elems() == 256
    }

    /// Bytes needed for `elems` elements, or `None` when `elems` is not a whole number of blocks (or overflows).
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::IQ4_NL => "iq4_nl",
            DType::Q2_K => "q2_k",
            DType::Q3_K => "q3_k",
            DType::Q4_K => "q4_k",
            DType::Q5_K => "q5_k",
            DType::Q6_K => "q6_k",
            DType::IQ4_XS => "iq4_xs",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

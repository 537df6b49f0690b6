/// Upper bounds a reader enforces before it allocates anything for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest prefill/decode payload in bytes (hidden states of one chunk).
    pub max_payload: usize,
    /// Most positions in one prefill chunk.
    pub max_tokens_per_frame: usize,
    /// Widest hidden state, in elements.
    pub max_width: usize,
    /// Largest payload of `Open`, `Token` and `Error` frames, in bytes.
    pub max_control_payload: usize,
    /// Most hops in the rest of a route.
    pub max_hops: usize,
    /// Most top log-probabilities in a token result.
    pub max_top: usize,
}

impl Default for Limits {
    /// 64 MiB payloads (4,096 positions of a 4,096-wide f32 hidden state), 8,192 positions, 65,536-wide hidden
    /// states, 64 KiB control frames, 64 hops, 64 top log-probabilities.
    fn default() -> Self {
        Self {
            max_payload: 64 << 20,
            max_tokens_per_frame: 8192,
            max_width: 65_536,
            max_control_payload: 64 << 10,
            max_hops: 64,
            max_top: 64,
        }
    }
}

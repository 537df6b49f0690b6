//! ggml block formats (being written).

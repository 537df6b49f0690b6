//! Where the default model (SmolLM2-135M-Instruct, GGUF Q4_1) lives and how to get it.

use std::path::PathBuf;

/// File name of the default model inside the model cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The command that fetches the default model on a fresh machine (`bash scripts/fetch-model.sh` does the same
/// without a build; CI uses it).
pub const FETCH_COMMAND: &str = "shardline fetch";

/// `$SHARDLINE_CACHE`, else `$XDG_CACHE_HOME/shardline`, else `~/.cache/shardline`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHARDLINE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("shardline")
}

/// `$SHARDLINE_MODEL` when set, else the default model in the cache.
pub fn default_model_path() -> PathBuf {
    match std::env::var_os("SHARDLINE_MODEL").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join("models").join(DEFAULT_MODEL_FILE),
    }
}

/// The default model's path if it is present, else a message saying exactly what to run.
pub fn locate_default_model() -> Result<PathBuf, String> {
    let path = default_model_path();
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the default model is not at {}; fetch it with `{FETCH_COMMAND}` or `bash scripts/fetch-model.sh` \
             (or pass --model PATH)",
            path.display()
        ))
    }
}

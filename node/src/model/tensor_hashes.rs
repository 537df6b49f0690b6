//! The per-tensor SHA-256 table the model id commits to (docs/PROTOCOL.md, "Model id"): one digest per tensor's
//! stored bytes, in canonical-name order. Hashing reads every weight once (about 0.3 s for the 93 MB SmolLM2-135M
//! Q4_1 file), so the table of a file is cached beside it (`<file>.shardline-hashes`, or
//! `<dir>/.shardline-hashes` for a Hugging Face directory) or, where that directory is read-only, in
//! `<cache dir>/hashes/`. A cache entry is used only when its key matches: the byte size and modification time of
//! every weight file, its inode and inode change time, and a digest of the configuration and tensor table, so an
//! edited file is hashed again even when its modification time was put back.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tracing::{debug, info};

use crate::error::{ModelError, Result};
use crate::model::open::ModelFiles;
use crate::model::source::WeightSource;

/// First line of a cache file; a file starting otherwise is ignored and rewritten.
const CACHE_MAGIC: &str = "shardline-tensor-hashes 1";
/// A cache file larger than this is not read (a table of 100,000 tensors is well under it), in bytes.
const MAX_CACHE_BYTES: u64 = 64 << 20;

/// `(canonical tensor name, SHA-256 of its stored bytes)`, sorted by name.
pub type TensorHashes = Vec<(String, [u8; 32])>;

/// Hashes every tensor of `source` (reads all weights).
pub fn hash_tensors(source: &dyn WeightSource) -> Result<TensorHashes> {
    let mut table = source.tensor_table();
    table.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(table.len());
    for t in &table {
        let entry = source.tensor(&t.name)?;
        out.push((t.name.clone(), Sha256::digest(entry.bytes.as_slice()).into()));
    }
    Ok(out)
}

/// The tensor hashes of an opened model, from the cache when its key still matches, else computed and cached
/// (a cache that cannot be written is only logged: the table is then computed at every start).
pub fn tensor_hashes(files: &ModelFiles, metadata_digest: &[u8; 32]) -> Result<TensorHashes> {
    let key = cache_key(files, metadata_digest)?;
    let candidates = cache_paths(files.path());
    for p in &candidates {
        if let Some(t) = read_cache(p, &key) {
            debug!(path = %p.display(), "tensor hashes read from the cache");
            return Ok(t);
        }
    }
    let started = std::time::Instant::now();
    let table = hash_tensors(files.weights().as_ref())?;
    info!(
        model = %files.path().display(),
        tensors = table.len(),
        ms = started.elapsed().as_millis() as u64,
        "hashed every tensor for the model id"
    );
    let text = render_cache(&key, &table);
    let written = candidates.iter().find(|p| write_cache(p, &text).is_ok());
    match written {
        Some(p) => debug!(path = %p.display(), "tensor hashes cached"),
        None => info!("tensor hashes could not be cached (no writable place); they are computed at every start"),
    }
    Ok(table)
}

/// Where the cache of the model at `path` may live, in order of preference.
pub fn cache_paths(path: &Path) -> Vec<PathBuf> {
    let beside = if path.is_dir() {
        path.join(".shardline-hashes")
    } else {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".shardline-hashes");
        path.with_file_name(name)
    };
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let tag = hex::encode(&Sha256::digest(canonical.to_string_lossy().as_bytes())[..16]);
    vec![beside, crate::default_model::cache_dir().join("hashes").join(format!("{tag}.shardline-hashes"))]
}

/// Size and modification time (ns) of every weight file, and the metadata digest, hashed into 64 hex digits.
fn cache_key(files: &ModelFiles, metadata_digest: &[u8; 32]) -> Result<String> {
    let path = files.path();
    let io = |p: &Path, source| ModelError::Io { path: p.display().to_string(), source };
    let mut weight_files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).map_err(|e| io(path, e))? {
            let p = e.map_err(|e| io(path, e))?.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                weight_files.push(p);
            }
        }
        weight_files.sort();
    } else {
        weight_files.push(path.to_path_buf());
    }
    let mut h = Sha256::new();
    h.update(metadata_digest);
    for p in &weight_files {
        let m = std::fs::metadata(p).map_err(|e| io(p, e))?;
        let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(m.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
        // The inode change time cannot be set back by `touch`, so a tampered file whose mtime was restored is
        // still hashed again.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            for v in [m.dev(), m.ino(), m.ctime() as u64, m.ctime_nsec() as u64] {
                h.update(v.to_le_bytes());
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn render_cache(key: &str, table: &TensorHashes) -> String {
    let mut s = format!("{CACHE_MAGIC}\nkey {key}\n");
    for (name, d) in table {
        let _ = writeln!(s, "{} {name}", hex::encode(d));
    }
    s
}

/// The table in the cache file at `path` when its key is `key`; `None` for a missing, foreign, stale or malformed
/// file (which is then rewritten).
fn read_cache(path: &Path, key: &str) -> Option<TensorHashes> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX_CACHE_BYTES {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != CACHE_MAGIC || lines.next()? != format!("key {key}") {
        return None;
    }
    let mut out = Vec::new();
    for line in lines {
        let (digest, name) = line.split_once(' ')?;
        let mut d = [0u8; 32];
        hex::decode_to_slice(digest, &mut d).ok()?;
        out.push((name.to_string(), d));
    }
    Some(out)
}

/// Writes through a temporary file and a rename, so a concurrent reader never sees half a table.
fn write_cache(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

//! The model id covers the configuration, the tensor table and every tensor's bytes: it is stable across opens and
//! copies, changes with any shape, dtype or configuration change, and with one flipped byte of one tensor, also when
//! the tensor digests come from the cache beside the file.

use std::time::Duration;

use shardline_kernels::DType;
use shardline_node::model::tensor_hashes::cache_paths;
use shardline_node::model::{ModelFiles, ModelId, open_model};
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf, write_tiny_hf};

fn gguf_id(spec: &TinySpec) -> ModelId {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(spec, &path).unwrap();
    ModelId::of(open_model(&path).unwrap().as_ref()).unwrap()
}

#[test]
fn stable_across_opens_and_formats_have_their_own() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(&spec, dir.path().join("m.gguf")).unwrap();
    write_tiny_hf(&spec, dir.path().join("hf")).unwrap();
    let id = |p: &str| ModelId::of_files(&ModelFiles::open(dir.path().join(p)).unwrap()).unwrap();
    assert_eq!(id("m.gguf"), id("m.gguf"));
    assert_eq!(id("hf"), id("hf"));
    // Different RoPE layout and Q/K rows: a different model as far as a route is concerned.
    assert_ne!(id("m.gguf"), id("hf"));
    // A copy of the file elsewhere is the same model.
    std::fs::copy(dir.path().join("m.gguf"), dir.path().join("copy.gguf")).unwrap();
    assert_eq!(id("m.gguf"), id("copy.gguf"));
    // The cached and the freshly hashed id agree.
    assert_eq!(id("m.gguf"), ModelId::of(open_model(dir.path().join("m.gguf")).unwrap().as_ref()).unwrap());
    assert!(dir.path().join("m.gguf.shardline-hashes").is_file());
    assert!(dir.path().join("hf/.shardline-hashes").is_file());
}

#[test]
fn changes_with_shapes_dtypes_and_config() {
    let base = TinySpec::default();
    let id = gguf_id(&base);
    let variants = [
        ("ffn", TinySpec { ffn: 160, ..base.clone() }),
        ("layers", TinySpec { n_layers: 3, ..base.clone() }),
        ("kv heads", TinySpec { n_kv_heads: 4, ..base.clone() }),
        ("vocab", TinySpec { vocab: base.vocab + 1, ..base.clone() }),
        ("dtype", TinySpec { dtypes: TinyDTypes { ffn: DType::F16, ..base.dtypes }, ..base.clone() }),
        ("tied", TinySpec { tied: true, ..base.clone() }),
        ("theta", TinySpec { rope_theta: 500_000.0, ..base.clone() }),
        ("context", TinySpec { context: 512, ..base.clone() }),
        ("weights", TinySpec { seed: base.seed + 1, ..base.clone() }),
    ];
    for (what, spec) in variants {
        assert_ne!(gguf_id(&spec), id, "{what}");
    }
    assert_eq!(gguf_id(&base), id);
}

/// The byte offset of the last byte of the file: GGUF puts the tensor data last, so it belongs to a tensor.
fn flip_last_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn one_tampered_tensor_byte_changes_the_id_even_with_a_cached_table_and_its_mtime_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&TinySpec::default(), &path).unwrap();
    let honest = ModelId::of_files(&ModelFiles::open(&path).unwrap()).unwrap();
    assert!(cache_paths(&path)[0].is_file(), "the table is cached beside the file");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    // Let the file-system clock move past the cache's timestamps (it ticks every few ms).
    std::thread::sleep(Duration::from_millis(30));
    flip_last_byte(&path);
    // An attacker puts the modification time back; size and metadata are unchanged too.
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    let tampered = ModelId::of_files(&ModelFiles::open(&path).unwrap()).unwrap();
    assert_ne!(tampered, honest);
    assert_eq!(tampered, ModelId::of(open_model(&path).unwrap().as_ref()).unwrap());
}

#[test]
fn a_corrupt_cache_is_rewritten_and_the_fallback_lives_in_the_cache_dir() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&TinySpec::default(), &path).unwrap();
    let fresh = ModelId::of(open_model(&path).unwrap().as_ref()).unwrap();
    let paths = cache_paths(&path);
    // Garbage where the cache should be: ignored and replaced.
    std::fs::write(&paths[0], "shardline-tensor-hashes 1\nkey 00\nzz\n").unwrap();
    assert_eq!(ModelId::of_files(&ModelFiles::open(&path).unwrap()).unwrap(), fresh);
    let text = std::fs::read_to_string(&paths[0]).unwrap();
    assert!(text.lines().count() > 3, "{text}");
    // The fallback place lives in the cache dir ($SHARDLINE_CACHE when set).
    assert!(paths[1].ends_with(paths[1].file_name().unwrap()));
    assert!(paths[1].to_string_lossy().contains("hashes"));
}

#[test]
fn text_forms_round_trip() {
    let id = gguf_id(&TinySpec::default());
    let hex = id.to_string();
    assert_eq!(hex.len(), 64);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(hex.parse::<ModelId>().unwrap(), id);
    assert!(hex.starts_with(&id.short()));
    assert!("xyz".parse::<ModelId>().is_err());
    assert!(hex[..62].parse::<ModelId>().is_err());
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, format!("\"{hex}\""));
    assert_eq!(serde_json::from_str::<ModelId>(&json).unwrap(), id);
}

//! The model id depends on the configuration and the tensor table only (unless weights are asked for), is stable
//! across opens, and changes with any shape, dtype or configuration change.

use shardline_kernels::DType;
use shardline_node::model::{IdScope, ModelId, open_model};
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf, write_tiny_hf};

fn gguf_id(spec: &TinySpec, scope: IdScope) -> ModelId {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(spec, &path).unwrap();
    ModelId::compute(open_model(&path).unwrap().as_ref(), scope).unwrap()
}

#[test]
fn stable_across_opens_and_formats_have_their_own() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(&spec, dir.path().join("m.gguf")).unwrap();
    write_tiny_hf(&spec, dir.path().join("hf")).unwrap();
    let id = |p: &str| ModelId::of(open_model(dir.path().join(p)).unwrap().as_ref()).unwrap();
    assert_eq!(id("m.gguf"), id("m.gguf"));
    assert_eq!(id("hf"), id("hf"));
    // Different RoPE layout and Q/K rows: a different model as far as a route is concerned.
    assert_ne!(id("m.gguf"), id("hf"));
    // A copy of the file elsewhere is the same model.
    std::fs::copy(dir.path().join("m.gguf"), dir.path().join("copy.gguf")).unwrap();
    assert_eq!(id("m.gguf"), id("copy.gguf"));
}

#[test]
fn changes_with_shapes_dtypes_and_config() {
    let base = TinySpec::default();
    let id = gguf_id(&base, IdScope::Metadata);
    let variants = [
        ("ffn", TinySpec { ffn: 160, ..base.clone() }),
        ("layers", TinySpec { n_layers: 3, ..base.clone() }),
        ("kv heads", TinySpec { n_kv_heads: 4, ..base.clone() }),
        ("vocab", TinySpec { vocab: base.vocab + 1, ..base.clone() }),
        ("dtype", TinySpec { dtypes: TinyDTypes { ffn: DType::F16, ..base.dtypes }, ..base.clone() }),
        ("tied", TinySpec { tied: true, ..base.clone() }),
        ("theta", TinySpec { rope_theta: 500_000.0, ..base.clone() }),
        ("context", TinySpec { context: 512, ..base.clone() }),
    ];
    for (what, spec) in variants {
        assert_ne!(gguf_id(&spec, IdScope::Metadata), id, "{what}");
    }
}

#[test]
fn weights_only_matter_when_asked_for() {
    let a = TinySpec::default();
    let b = TinySpec { seed: a.seed + 1, ..a.clone() };
    assert_eq!(gguf_id(&a, IdScope::Metadata), gguf_id(&b, IdScope::Metadata));
    assert_ne!(gguf_id(&a, IdScope::WithWeights), gguf_id(&b, IdScope::WithWeights));
    assert_eq!(gguf_id(&a, IdScope::WithWeights), gguf_id(&a, IdScope::WithWeights));
    assert_ne!(gguf_id(&a, IdScope::WithWeights), gguf_id(&a, IdScope::Metadata));
}

#[test]
fn text_forms_round_trip() {
    let id = gguf_id(&TinySpec::default(), IdScope::Metadata);
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

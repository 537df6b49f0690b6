//! The SentencePiece-style tokenizer (GGUF `tokenizer.ggml.model = "llama"`) against llama.cpp.
//!
//! Reference: `tests/fixtures/tokenizer_spm.json`, written by `scripts/make-tokenizer-fixtures.py`: a small vocabulary
//! of scored pieces, byte-fallback tokens and control tokens, put into a vocab-only GGUF, loaded into llama.cpp, and
//! the ids llama.cpp gives for a set of strings. The vocabulary is stored in the fixture, so no model is needed.

use serde_json::Value;
use shardline_node::ModelError;
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::{GgufFile, GgufValue};
use shardline_node::formats::gguf_writer::GgufWriter;
use shardline_node::tokenizer::{GgufVocab, TokenKind, Tokenizer};

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/tokenizer_spm.json")).expect("fixture is JSON")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn vocab(fx: &Value) -> GgufVocab {
    let v = &fx["vocab"];
    GgufVocab {
        model: v["model"].as_str().unwrap().to_owned(),
        tokens: v["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect(),
        token_types: v["token_types"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect(),
        scores: v["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32).collect(),
        bos: v["bos"].as_u64().map(|x| x as u32),
        eos: v["eos"].as_u64().map(|x| x as u32),
        unk: v["unk"].as_u64().map(|x| x as u32),
        add_bos: v["add_bos"].as_bool(),
        add_eos: v["add_eos"].as_bool(),
        add_space_prefix: v["add_space_prefix"].as_bool(),
        ..GgufVocab::default()
    }
}

fn cases(fx: &Value) -> impl Iterator<Item = (&str, bool, Vec<u32>, &str)> {
    fx["cases"].as_array().unwrap().iter().map(|c| {
        (
            c["text"].as_str().unwrap(),
            c["add_special"].as_bool().unwrap(),
            u32s(&c["ids"]),
            c["detokenized"].as_str().unwrap(),
        )
    })
}

fn assert_ids_match(tokenizer: &Tokenizer, fx: &Value) {
    let mut failures = Vec::new();
    for (text, add_special, expected, _) in cases(fx) {
        let got = tokenizer.encode(text, add_special).unwrap();
        if got != expected {
            failures
                .push(format!("{text:?} (add_special {add_special}):\n  llama.cpp {expected:?}\n  ours      {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} cases differ from llama.cpp:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn ids_match_llama_cpp() {
    let fx = fixture();
    let tokenizer = Tokenizer::from_gguf_vocab(vocab(&fx)).unwrap();
    assert!(fx["cases"].as_array().unwrap().len() >= 40);
    assert_ids_match(&tokenizer, &fx);
}

#[test]
fn ids_match_llama_cpp_through_a_gguf_file() {
    let fx = fixture();
    let v = vocab(&fx);
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama").unwrap();
    w.add("tokenizer.ggml.model", v.model.as_str()).unwrap();
    w.add("tokenizer.ggml.tokens", GgufValue::from_strs(&v.tokens)).unwrap();
    w.add("tokenizer.ggml.token_type", v.token_types.clone()).unwrap();
    w.add("tokenizer.ggml.scores", v.scores.clone()).unwrap();
    w.add("tokenizer.ggml.bos_token_id", 1u32).unwrap();
    w.add("tokenizer.ggml.eos_token_id", 2u32).unwrap();
    w.add("tokenizer.ggml.unknown_token_id", 0u32).unwrap();
    w.add("tokenizer.ggml.add_bos_token", true).unwrap();
    w.add("tokenizer.ggml.add_eos_token", false).unwrap();
    w.add("tokenizer.ggml.add_space_prefix", true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm-vocab.gguf");
    w.write(&path).unwrap();

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(GgufVocab::from_gguf(&file).unwrap(), v);
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    assert_ids_match(&tokenizer, &fx);
}

#[test]
fn vocabulary_facts_match_llama_cpp() {
    let fx = fixture();
    let tokenizer = Tokenizer::from_gguf_vocab(vocab(&fx)).unwrap();
    assert_eq!(tokenizer.bos(), Some(1));
    assert_eq!(tokenizer.eos(), Some(2));
    assert_eq!(tokenizer.unk(), Some(0));
    assert!(tokenizer.add_bos());
    assert_eq!(tokenizer.end_tokens(), u32s(&fx["eog"]).as_slice());
    let im_end = tokenizer.token_id("<|im_end|>").unwrap();
    assert_eq!(tokenizer.eot(), Some(im_end), "<|im_end|> is found as the end of turn by its text");
    assert_eq!(tokenizer.token_kind(3), Some(TokenKind::Byte));
    assert_eq!(tokenizer.token_to_piece(3 + 0x0A).unwrap(), b"\n");
    assert!(tokenizer.chat_template().is_none());
    assert!(matches!(tokenizer.apply_chat_template(&[], true), Err(ModelError::ChatTemplate(_))));
}

#[test]
fn pieces_match_llama_cpp_and_decoding_drops_the_space_prefix() {
    let fx = fixture();
    let tokenizer = Tokenizer::from_gguf_vocab(vocab(&fx)).unwrap();
    for (text, add_special, expected, detokenized) in cases(&fx) {
        // llama-cpp-python's detokenize joins token_to_piece outputs, space prefix included.
        let pieces: Vec<u8> = expected.iter().flat_map(|&id| tokenizer.token_to_piece(id).unwrap().to_vec()).collect();
        assert_eq!(String::from_utf8_lossy(&pieces), detokenized, "pieces of {text:?}");

        // SentencePiece writes spaces as '▁', so a '▁' in the input cannot come back.
        if text.contains('\u{2581}') {
            continue;
        }
        if !add_special {
            assert_eq!(tokenizer.decode(&expected).unwrap(), text, "decode(encode({text:?}))");
        }
        let has_special = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"].iter().any(|s| text.contains(s));
        if !has_special {
            assert_eq!(tokenizer.decode_skip_special(&expected).unwrap(), text, "decode without BOS of {text:?}");
        }
    }
}

#[test]
fn streaming_waits_for_whole_characters_from_byte_tokens() {
    let fx = fixture();
    let tokenizer = Tokenizer::from_gguf_vocab(vocab(&fx)).unwrap();
    let ids = tokenizer.encode("日本語", false).unwrap();
    assert!(ids.iter().skip(1).all(|&id| tokenizer.token_kind(id) == Some(TokenKind::Byte)));
    let mut stream = tokenizer.stream_decoder(true);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(&tokenizer, id).unwrap()).collect();
    // "▁" first (its space dropped as the prefix), then three bytes per character.
    assert_eq!(pieces, vec!["", "", "", "日", "", "", "本", "", "", "語"]);

    // A character that never completes comes out as U+FFFD at the end, not in the middle.
    let mut stream = tokenizer.stream_decoder(true);
    assert_eq!(stream.push(&tokenizer, 3 + 0xE6).unwrap(), "");
    assert_eq!(stream.push(&tokenizer, 3 + 0x97).unwrap(), "");
    assert_eq!(stream.pending_bytes(), 2);
    assert_eq!(stream.finish(), "\u{FFFD}");
    // A byte that cannot continue the pending character is replaced at once, and what follows still decodes.
    assert_eq!(stream.push(&tokenizer, 3 + 0xE6).unwrap(), "");
    assert_eq!(stream.push(&tokenizer, 3 + b'A' as u32).unwrap(), "\u{FFFD}A");
    // Ids outside the vocabulary are errors, not panics.
    assert!(matches!(stream.push(&tokenizer, 1_000_000), Err(ModelError::Tokenizer(_))));
    assert!(tokenizer.decode(&[5, 1_000_000]).is_err());
    assert!(tokenizer.token_to_piece(u32::MAX).is_err());
}

#[test]
fn malformed_vocabularies_are_errors() {
    let fx = fixture();
    let good = vocab(&fx);

    let mut v = good.clone();
    v.token_types.pop();
    assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(ModelError::BadMetadata { .. })));

    let mut v = good.clone();
    v.scores.truncate(3);
    assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(ModelError::BadMetadata { .. })));

    let mut v = good.clone();
    v.bos = Some(v.tokens.len() as u32);
    assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(ModelError::BadMetadata { .. })));

    let mut v = good.clone();
    v.model = "t5".into();
    assert!(matches!(Tokenizer::from_gguf_vocab(v), Err(ModelError::BadMetadata { .. })));

    let mut v = good.clone();
    v.tokens.clear();
    v.token_types.clear();
    v.scores.clear();
    assert!(Tokenizer::from_gguf_vocab(v).is_err());

    let bpe = GgufVocab {
        model: "gpt2".into(),
        pre: Some("no-such-pre-tokenizer".into()),
        tokens: vec!["a".into(), "b".into()],
        ..GgufVocab::default()
    };
    assert!(matches!(Tokenizer::from_gguf_vocab(bpe), Err(ModelError::BadMetadata { .. })));

    let bad_merge = GgufVocab {
        model: "gpt2".into(),
        pre: Some("gpt-2".into()),
        tokens: vec!["a".into(), "b".into(), "ab".into()],
        merges: vec!["ab".into()],
        ..GgufVocab::default()
    };
    assert!(matches!(Tokenizer::from_gguf_vocab(bad_merge), Err(ModelError::BadMetadata { .. })));
}

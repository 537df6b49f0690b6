//! Hugging Face tokenizer directories: what `tokenizer_config.json`, `generation_config.json` and
//! `chat_template.jinja` decide, and decoding checked against the `tokenizers` crate's own decoder pipeline.

use std::path::Path;

use serde_json::{Value, json};
use shardline_node::ModelError;
use shardline_node::tokenizer::{ChatMessage, TokenKind, Tokenizer};

fn write(dir: &Path, name: &str, value: &Value) {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn added(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// A byte-level BPE `tokenizer.json` (GPT-2 alphabet, a few merges) whose post-processor puts `<s>` in front.
fn byte_level_tokenizer_json() -> Value {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab = serde_json::Map::new();
    for (i, name) in ["<s>", "</s>", "<|eot_id|>"].iter().enumerate() {
        vocab.insert(name.to_string(), json!(i));
    }
    for c in alphabet {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    for piece in ["he", "hel", "hell", "hello", "\u{120}w", "\u{120}wo"] {
        vocab.insert(piece.to_string(), json!(vocab.len()));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "</s>"), added(2, "<|eot_id|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": ["h e", "he l", "hel l", "hell o", "\u{120} w", "\u{120}w o"]
        }
    })
}

/// A Llama 2 style `tokenizer.json`: `▁` prepended and written for spaces by the normalizer, BPE with byte
/// fallback, and the decoder that turns `▁` back into spaces, bytes into text and strips the leading space.
fn sentencepiece_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for name in ["<unk>", "<s>", "</s>"] {
        vocab.insert(name.to_string(), json!(vocab.len()));
    }
    for b in 0..=255u8 {
        vocab.insert(format!("<0x{b:02X}>"), json!(vocab.len()));
    }
    for piece in ["\u{2581}", "h", "i", "\u{2581}h", "\u{2581}hi", "!"] {
        vocab.insert(piece.to_string(), json!(vocab.len()));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab,
            "merges": ["\u{2581} h", "\u{2581}h i"]
        }
    })
}

#[test]
fn post_processor_decides_bos_when_the_config_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &byte_level_tokenizer_json());
    write(dir.path(), "tokenizer_config.json", &json!({"bos_token": "<s>", "eos_token": "</s>"}));
    let t = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(t.add_bos());
    assert!(!t.add_eos());
    let hello = t.token_id("hello").unwrap();
    let wo = t.token_id("\u{120}wo").unwrap();
    assert_eq!(t.encode("hello<|eot_id|>", true).unwrap(), vec![0, hello, 2]);
    assert_eq!(t.encode("hello wo", false).unwrap(), vec![hello, wo]);
    assert_eq!(t.decode(&[0, hello, wo, 2]).unwrap(), "<s>hello wo<|eot_id|>");
    assert_eq!(t.decode_skip_special(&[0, hello, wo, 2]).unwrap(), "hello wo");
    assert_eq!(t.token_kind(2), Some(TokenKind::Control));
    // <|eot_id|> ends generation by its text, next to the configured EOS.
    assert_eq!(t.eot(), Some(2));
    assert_eq!(t.end_tokens(), &[1, 2]);
    assert!(t.chat_template().is_none());
}

#[test]
fn config_flags_generation_config_and_template_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &byte_level_tokenizer_json());
    write(
        dir.path(),
        "tokenizer_config.json",
        &json!({
            "add_bos_token": false,
            "add_eos_token": true,
            "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "special": true},
            "eos_token": {"content": "</s>", "lstrip": false, "normalized": false, "rstrip": false, "special": true},
        }),
    );
    write(dir.path(), "generation_config.json", &json!({"bos_token_id": 0, "eos_token_id": [1, 2]}));
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}",
    )
    .unwrap();
    let t = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(!t.add_bos());
    assert!(t.add_eos());
    let hello = t.token_id("hello").unwrap();
    assert_eq!(t.encode("hello", true).unwrap(), vec![hello, 1], "EOS added, BOS not, as the config says");
    assert_eq!(t.bos(), Some(0));
    assert_eq!(t.eos(), Some(1));
    assert_eq!(t.end_tokens(), &[1, 2]);
    let prompt = t.apply_chat_template(&[ChatMessage::user("hi")], true).unwrap();
    assert_eq!(prompt, "<s>[user] hi</s>");
}

#[test]
fn named_templates_pick_default_and_bad_configs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &byte_level_tokenizer_json());
    write(
        dir.path(),
        "tokenizer_config.json",
        &json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
        ]}),
    );
    let t = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(t.apply_chat_template(&[ChatMessage::system("a"), ChatMessage::user("b")], false).unwrap(), "ab");
    assert_eq!(t.bos(), None);

    write(dir.path(), "tokenizer_config.json", &json!({"chat_template": 5}));
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(ModelError::Corrupt { .. })));

    std::fs::write(dir.path().join("tokenizer_config.json"), "{ not json").unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(ModelError::Corrupt { .. })));

    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(ModelError::Corrupt { .. })));

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(empty.path()), Err(ModelError::Io { .. })));
}

#[test]
fn template_that_does_not_compile_still_tokenizes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &byte_level_tokenizer_json());
    write(dir.path(), "tokenizer_config.json", &json!({"chat_template": "{% for m in %}"}));
    let t = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(t.chat_template().is_none());
    assert!(matches!(t.apply_chat_template(&[ChatMessage::user("x")], true), Err(ModelError::ChatTemplate(_))));
    assert!(!t.encode("hello", false).unwrap().is_empty());
}

#[test]
fn sentencepiece_style_decoding_agrees_with_the_tokenizers_crate() {
    let dir = tempfile::tempdir().unwrap();
    let json = sentencepiece_tokenizer_json();
    write(dir.path(), "tokenizer.json", &json);
    write(dir.path(), "tokenizer_config.json", &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}));
    let t = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let reference = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();

    assert!(t.add_bos());
    assert_eq!(t.unk(), Some(0));
    let hi = t.token_id("\u{2581}hi").unwrap();
    assert_eq!(t.encode("hi hi", true).unwrap(), vec![1, hi, hi]);
    assert_eq!(t.token_kind(3 + 0xC3), Some(TokenKind::Byte));

    for text in ["hi hi", "hi", "é hi", "  hi!", "hi 日本", "!"] {
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids, reference.encode(text, true).unwrap().get_ids(), "ids of {text:?}");
        let expected = reference.decode(&ids, true).unwrap();
        assert_eq!(t.decode_skip_special(&ids).unwrap(), expected, "decode of {text:?}");
        assert_eq!(expected, text, "the reference round-trips {text:?}");

        let mut stream = t.stream_decoder(true);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&stream.push(&t, id).unwrap());
        }
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, expected, "stream of {text:?}");
    }
}

/// Mistral v0.3 style: no normalizer, a `Metaspace` pre-tokenizer that prepends `▁` only to the start of the input
/// (not after added tokens), and an added control token used inside the text.
fn metaspace_first_tokenizer_json() -> Value {
    let mut json = sentencepiece_tokenizer_json();
    json["normalizer"] = Value::Null;
    json["pre_tokenizer"] =
        json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
    json["added_tokens"].as_array_mut().unwrap().push(added(265, "[INST]"));
    json["model"]["vocab"]["[INST]"] = json!(265);
    json
}

#[test]
fn metaspace_first_prefixes_only_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let json = metaspace_first_tokenizer_json();
    write(dir.path(), "tokenizer.json", &json);
    write(dir.path(), "tokenizer_config.json", &json!({"bos_token": "<s>", "eos_token": "</s>"}));
    let t = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let reference = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
    for text in ["hi", "[INST] hi hi", "hi[INST]hi", "[INST]hi", " hi[INST]  hi!"] {
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids, reference.encode(text, true).unwrap().get_ids(), "ids of {text:?}");
        for skip in [true, false] {
            let expected = reference.decode(&ids, skip).unwrap();
            let ours = if skip { t.decode_skip_special(&ids) } else { t.decode(&ids) };
            assert_eq!(ours.unwrap(), expected, "decode of {text:?} (skip special {skip})");
        }
    }
}

#[test]
fn tokenizer_is_shareable_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Tokenizer>();
    shareable::<shardline_node::tokenizer::StreamDecoder>();
}

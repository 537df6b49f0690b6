//! The SmolLM2 tokenizer (GGUF byte-level BPE, pre-tokenizer "smollm") against llama.cpp.
//!
//! Reference: `tests/fixtures/tokenizer_smollm2.json`, written by `scripts/make-tokenizer-fixtures.py` with
//! llama-cpp-python on the same GGUF: token ids of about forty strings with and without special handling, the
//! detokenized text, the end-of-generation set, and chat prompts rendered by Python's jinja2 the way transformers
//! does (plus llama.cpp's own ChatML formatter where it applies).

use std::path::Path;

use serde_json::{Value, json};
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::GgufFile;
use shardline_node::test_models::model_for_tests;
use shardline_node::tokenizer::{ChatMessage, GgufVocab, TokenKind, Tokenizer};

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/tokenizer_smollm2.json")).expect("fixture is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn cases(fx: &Value) -> impl Iterator<Item = (&str, bool, Vec<u32>, &str)> {
    fx["cases"].as_array().expect("cases").iter().map(|c| {
        (
            c["text"].as_str().expect("text"),
            c["add_special"].as_bool().expect("add_special"),
            ids(&c["ids"]),
            c["detokenized"].as_str().expect("detokenized"),
        )
    })
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("messages")
}

fn open(test: &str) -> Option<(GgufFile, Tokenizer)> {
    let path = model_for_tests(test)?;
    let file = GgufFile::open(&path).expect("open model");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer from GGUF");
    Some((file, tokenizer))
}

/// Encodes every fixture string and reports all disagreements with llama.cpp at once.
fn assert_ids_match(tokenizer: &Tokenizer, fx: &Value) {
    let mut failures = Vec::new();
    let mut n = 0;
    for (text, add_special, expected, _) in cases(fx) {
        let got = tokenizer.encode(text, add_special).expect("encode");
        if got != expected {
            failures
                .push(format!("{text:?} (add_special {add_special}):\n  llama.cpp {expected:?}\n  ours      {got:?}"));
        }
        n += 1;
    }
    assert!(n >= 80, "fixture has {n} cases");
    assert!(failures.is_empty(), "{} of {n} cases differ from llama.cpp:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn ids_match_llama_cpp() {
    let Some((_, tokenizer)) = open("ids_match_llama_cpp") else { return };
    assert_ids_match(&tokenizer, &fixture());
}

#[test]
fn vocabulary_facts_match_llama_cpp() {
    let Some((_, tokenizer)) = open("vocabulary_facts_match_llama_cpp") else { return };
    let fx = fixture();
    assert_eq!(tokenizer.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tokenizer.bos().map(u64::from), fx["bos"].as_u64());
    assert_eq!(tokenizer.eos().map(u64::from), fx["eos"].as_u64());
    assert_eq!(tokenizer.add_bos(), fx["add_bos"].as_bool().unwrap());
    assert!(!tokenizer.add_eos());
    assert_eq!(tokenizer.end_tokens(), ids(&fx["eog"]).as_slice(), "end-of-generation set");
    assert_eq!(tokenizer.eot().map(u64::from), fx["eot"].as_u64(), "end of turn");
    let im_end = tokenizer.token_id("<|im_end|>").expect("<|im_end|> in vocab");
    assert!(tokenizer.is_end_token(im_end));
    assert!(!tokenizer.is_end_token(tokenizer.token_id("<|im_start|>").unwrap()));
    assert_eq!(tokenizer.token_kind(im_end), Some(TokenKind::Control));
    assert_eq!(tokenizer.token_text(im_end), Some("<|im_end|>"));
    assert_eq!(tokenizer.token_to_piece(im_end).unwrap(), b"<|im_end|>");
    assert_eq!(tokenizer.token_text(905), Some("\u{120}world"));
    assert_eq!(tokenizer.token_to_piece(905).unwrap(), b" world");
}

#[test]
fn decoding_matches_llama_cpp_and_round_trips() {
    let Some((_, tokenizer)) = open("decoding_matches_llama_cpp_and_round_trips") else { return };
    for (text, add_special, expected, detokenized) in cases(&fixture()) {
        let pieces: Vec<u8> = expected.iter().flat_map(|&id| tokenizer.token_to_piece(id).unwrap().to_vec()).collect();
        assert_eq!(String::from_utf8_lossy(&pieces), detokenized, "pieces of {text:?}");
        assert_eq!(tokenizer.decode(&expected).unwrap(), detokenized, "decode of {text:?}");
        let ours = tokenizer.encode(text, add_special).unwrap();
        assert_eq!(tokenizer.decode(&ours).unwrap(), text, "decode(encode({text:?}))");
    }
}

#[test]
fn streaming_holds_back_partial_characters() {
    let Some((_, tokenizer)) = open("streaming_holds_back_partial_characters") else { return };
    let mut held_back = 0;
    for (text, _, expected, _) in cases(&fixture()) {
        for skip_special in [false, true] {
            let mut stream = tokenizer.stream_decoder(skip_special);
            let mut out = String::new();
            for &id in &expected {
                let piece = stream.push(&tokenizer, id).unwrap();
                if piece.is_empty() && !tokenizer.token_to_piece(id).unwrap().is_empty() {
                    held_back += 1;
                }
                assert!(!piece.contains('\u{FFFD}'), "{text:?}: a piece split a character");
                out.push_str(&piece);
            }
            assert_eq!(stream.pending_bytes(), 0, "{text:?}: bytes left over");
            out.push_str(&stream.finish());
            let whole =
                if skip_special { tokenizer.decode_skip_special(&expected) } else { tokenizer.decode(&expected) };
            assert_eq!(out, whole.unwrap(), "stream of {text:?}");
        }
    }
    assert!(held_back > 0, "the emoji and CJK cases split characters across tokens");

    // Without special tokens the chat markup disappears and only the text is left.
    let prompt = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n", false).unwrap();
    assert_eq!(tokenizer.decode_skip_special(&prompt).unwrap(), "user\nHi\n");
}

#[test]
fn chat_template_renders_chatml_like_jinja2_and_llama_cpp() {
    let Some((_, tokenizer)) = open("chat_template_renders_chatml_like_jinja2_and_llama_cpp") else { return };
    let fx = fixture();
    let template = tokenizer.chat_template().expect("SmolLM2 has a chat template");
    assert_eq!(template.source(), fx["chat_template"].as_str().unwrap());

    // Written out by hand from the model card: the default system prompt comes first when none is given.
    let hand = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(tokenizer.apply_chat_template(&[ChatMessage::user("Hi there!")], true).unwrap(), hand);

    let chats = fx["chats"].as_array().unwrap();
    assert!(chats.iter().any(|c| !c["llama_cpp_chatml"].is_null()));
    for chat in chats {
        let msgs = messages(&chat["messages"]);
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let rendered = tokenizer.apply_chat_template(&msgs, add).unwrap();
        assert_eq!(rendered, chat["jinja2"].as_str().unwrap(), "jinja2 rendering of {msgs:?}");
        if let Some(builtin) = chat["llama_cpp_chatml"].as_str() {
            assert_eq!(rendered, builtin, "llama.cpp ChatML of {msgs:?}");
        }
        assert_eq!(tokenizer.encode(&rendered, false).unwrap(), ids(&chat["ids"]), "ids of the prompt for {msgs:?}");
    }
}

#[test]
fn other_pre_tokenizers_match_llama_cpp() {
    let Some((file, _)) = open("other_pre_tokenizers_match_llama_cpp") else { return };
    let fx: Value = serde_json::from_str(include_str!("fixtures/tokenizer_bpe_pre.json")).expect("fixture is JSON");
    let mut base = GgufVocab::from_gguf(&file).unwrap();
    // Multi-digit tokens and a word no merge reaches, so that digit grouping and llama-bpe's ignore_merges show.
    let strs = |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let extra = strs(&fx["extra_tokens"]);
    base.token_types.extend(std::iter::repeat_n(1, extra.len()));
    base.tokens.extend(extra);
    base.merges.extend(strs(&fx["extra_merges"]));
    let pres = fx["pre"].as_object().unwrap();
    assert!(pres.contains_key("llama-bpe") && pres.contains_key("default") && pres.contains_key("gpt-2"));
    for (pre, expected) in pres {
        // The fixture's files carry no add_bos_token, so the per-name default is what is compared.
        let vocab = GgufVocab { pre: Some(pre.clone()), add_bos: None, chat_template: None, ..base.clone() };
        let tokenizer = Tokenizer::from_gguf_vocab(vocab).unwrap();
        assert_eq!(tokenizer.add_bos(), expected["add_bos"].as_bool().unwrap(), "{pre}: add_bos default");
        let mut failures = Vec::new();
        for case in expected["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let add_special = case["add_special"].as_bool().unwrap();
            let got = tokenizer.encode(text, add_special).unwrap();
            if got != ids(&case["ids"]) {
                failures.push(format!("{text:?} ({add_special}): llama.cpp {:?}, ours {got:?}", ids(&case["ids"])));
            }
        }
        assert!(failures.is_empty(), "pre-tokenizer {pre}:\n{}", failures.join("\n"));
    }
}

/// Writes SmolLM2's tokenizer as a Hugging Face directory the way the model's own repository has it: BPE with the
/// GGUF's vocabulary and merges, digits split one by one, then byte-level; control tokens as special added tokens;
/// BOS/EOS and the template in `tokenizer_config.json` (BOS as an AddedToken object, the template as a list).
fn write_hf_dir(vocab: &GgufVocab, dir: &Path) {
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

    let map: Vocab = vocab.tokens.iter().zip(0u32..).map(|(t, id)| (t.clone(), id)).collect();
    let merges = vocab.merges.iter().map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).unwrap());
    let bpe = BPE::builder().vocab_and_merges(map, merges.collect()).build().unwrap();
    let mut hf = HfTokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    hf.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, ty)| **ty == 3)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    hf.add_special_tokens(&specials);
    hf.save(dir.join("tokenizer.json"), false).unwrap();
    let config = json!({
        "add_prefix_space": false,
        "bos_token": {"content": "<|im_start|>", "lstrip": false, "normalized": false, "rstrip": false,
                      "single_word": false, "special": true},
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": [{"name": "default", "template": vocab.chat_template.clone().unwrap()},
                          {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"}],
        "clean_up_tokenization_spaces": false,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

#[test]
fn hf_directory_of_the_same_tokenizer_agrees() {
    let Some((file, gguf_tokenizer)) = open("hf_directory_of_the_same_tokenizer_agrees") else { return };
    let vocab = GgufVocab::from_gguf(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(&vocab, dir.path());
    let tokenizer = Tokenizer::from_hf_dir(dir.path()).unwrap();

    let fx = fixture();
    // tokenizer.json finds its special tokens and splits digits its own way; the ids must still be llama.cpp's.
    assert_ids_match(&tokenizer, &fx);
    assert_eq!(tokenizer.vocab_size(), gguf_tokenizer.vocab_size());
    assert_eq!(tokenizer.bos(), Some(1));
    assert_eq!(tokenizer.eos(), Some(2));
    assert!(!tokenizer.add_bos());
    assert_eq!(tokenizer.end_tokens(), gguf_tokenizer.end_tokens());
    for (text, _, expected, detokenized) in cases(&fx) {
        assert_eq!(tokenizer.decode(&expected).unwrap(), detokenized, "decode of {text:?}");
    }
    for chat in fx["chats"].as_array().unwrap() {
        let rendered = tokenizer
            .apply_chat_template(&messages(&chat["messages"]), chat["add_generation_prompt"].as_bool().unwrap());
        assert_eq!(rendered.unwrap(), chat["jinja2"].as_str().unwrap());
    }
}

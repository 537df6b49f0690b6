//! Hugging Face tokenizer directories: `tokenizer.json` run by the `tokenizers` crate, with BOS/EOS, their use and
//! the chat template from `tokenizer_config.json` (or `chat_template.jinja`), and end tokens from
//! `generation_config.json`.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::{ModelError, Result};
use crate::tokenizer::vocab::{PieceStyle, SpacePrefix, TokenKind, parse_byte_token};
use crate::tokenizer::{EngineSpec, Parts, Tokenizer};

/// Wraps a `tokenizers` error with what was being done.
pub(crate) fn error(what: &'static str) -> impl Fn(tokenizers::Error) -> ModelError {
    move |e| ModelError::Tokenizer(format!("{what}: {e}"))
}

fn read(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io { path: path.display().to_string(), source }),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let Some(bytes) = read(path)? else { return Ok(None) };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ModelError::Corrupt { path: path.display().to_string(), detail: e.to_string() })
}

/// Every `"type"` named anywhere inside a `tokenizer.json` component.
fn component_types(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(t)) = map.get("type") {
                out.push(t.clone());
            }
            map.values().for_each(|v| component_types(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| component_types(v, out)),
        _ => {}
    }
}

/// A special-token entry of `tokenizer_config.json`: a string, or an AddedToken object with `content`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}` of which the one named
/// `default` (else the first) is the chat template.
fn chat_template(config: &Value, path: &Path) -> Result<Option<String>> {
    let bad = |detail: &str| ModelError::Corrupt { path: path.display().to_string(), detail: detail.to_string() };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |item: &Value| item.get("name").and_then(Value::as_str) == Some("default");
            let chosen = list.iter().find(|item| named(item)).or(list.first());
            match chosen {
                None => Ok(None),
                Some(item) => item
                    .get("template")
                    .and_then(Value::as_str)
                    .map(|s| Some(s.to_owned()))
                    .ok_or_else(|| bad("chat_template entry has no template string")),
            }
        }
        Some(_) => Err(bad("chat_template is neither a string nor a list of named templates")),
    }
}

/// Ids named by `generation_config.json`'s `eos_token_id` (a number or a list).
fn generation_eos(generation: Option<&Value>) -> Vec<u32> {
    let ids = match generation.and_then(|g| g.get("eos_token_id")) {
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_u64).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => Vec::new(),
    };
    ids.into_iter().filter_map(|id| u32::try_from(id).ok()).collect()
}

/// The objects of a component and, for a `Sequence`, of its parts.
fn parts(component: &Value) -> Vec<&Value> {
    let mut out = vec![component];
    for key in ["normalizers", "pretokenizers", "decoders"] {
        if let Some(list) = component.get(key).and_then(Value::as_array) {
            out.extend(list);
        }
    }
    out
}

/// Where a SentencePiece-style `tokenizer.json` writes a space in front of text: a `Prepend` normalizer does it
/// on every stretch between added tokens, a `Metaspace` pre-tokenizer as its `prepend_scheme` says; with neither
/// (older files put it in the decoder only), a decoder that strips a leading space implies the normalizer default.
fn space_prefix(json: &Value) -> SpacePrefix {
    let of_type = |v: &Value, t: &str| v.get("type").and_then(Value::as_str) == Some(t);
    if parts(&json["normalizer"]).iter().any(|n| of_type(n, "Prepend")) {
        return SpacePrefix::AfterSpecial;
    }
    if let Some(meta) = parts(&json["pre_tokenizer"]).into_iter().find(|p| of_type(p, "Metaspace")) {
        return match meta.get("prepend_scheme").and_then(Value::as_str) {
            Some("first") => SpacePrefix::First,
            Some("never") => SpacePrefix::None,
            Some(_) => SpacePrefix::AfterSpecial,
            None if meta.get("add_prefix_space").and_then(Value::as_bool) == Some(false) => SpacePrefix::None,
            None => SpacePrefix::AfterSpecial,
        };
    }
    let strips = |d: &&Value| {
        (of_type(d, "Strip") && d.get("content").and_then(Value::as_str) == Some(" ") && d["start"].as_u64() >= Some(1))
            || (of_type(d, "Metaspace") && d.get("prepend_scheme").and_then(Value::as_str) != Some("never"))
    };
    if parts(&json["decoder"]).iter().any(strips) { SpacePrefix::AfterSpecial } else { SpacePrefix::None }
}

pub(crate) fn load(dir: &Path) -> Result<Tokenizer> {
    let json_path = dir.join("tokenizer.json");
    let bytes = read(&json_path)?.ok_or_else(|| ModelError::Io {
        path: json_path.display().to_string(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let hf = HfTokenizer::from_bytes(&bytes)
        .map_err(|e| ModelError::Corrupt { path: json_path.display().to_string(), detail: e.to_string() })?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::Corrupt { path: json_path.display().to_string(), detail: e.to_string() })?;
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?.unwrap_or(Value::Null);
    let generation = read_json(&dir.join("generation_config.json"))?;

    // How normal tokens spell bytes, read from the decoder (else the pre-tokenizer).
    let mut decoder = Vec::new();
    component_types(&json["decoder"], &mut decoder);
    let mut pre = Vec::new();
    component_types(&json["pre_tokenizer"], &mut pre);
    let has = |list: &[String], t: &str| list.iter().any(|x| x == t);
    let style = if has(&decoder, "ByteLevel") || (decoder.is_empty() && has(&pre, "ByteLevel")) {
        PieceStyle::ByteLevel
    } else if ["ByteFallback", "Metaspace", "Replace"].iter().any(|t| has(&decoder, t)) {
        PieceStyle::SentencePiece
    } else {
        return Err(ModelError::Tokenizer(format!(
            "{}: decoder {decoder:?} is neither byte-level nor SentencePiece-style",
            json_path.display()
        )));
    };
    let space_prefix = if style == PieceStyle::SentencePiece { space_prefix(&json) } else { SpacePrefix::None };

    // Token table: model vocabulary plus added tokens; ids nobody claims stay unused.
    let vocab = hf.get_vocab(true);
    let n = vocab.values().max().map_or(0, |&max| max as usize + 1);
    let mut texts = vec![String::new(); n];
    let mut kinds = vec![TokenKind::Unused; n];
    for (text, id) in vocab {
        let kind = match parse_byte_token(&text) {
            Some(_) if style == PieceStyle::SentencePiece => TokenKind::Byte,
            _ => TokenKind::Normal,
        };
        kinds[id as usize] = kind;
        texts[id as usize] = text;
    }
    for (id, added) in hf.get_added_tokens_decoder() {
        if let Some(kind) = kinds.get_mut(id as usize) {
            *kind = if added.special { TokenKind::Control } else { TokenKind::UserDefined };
        }
    }

    let bos_text = token_text(config.get("bos_token"));
    let eos_text = token_text(config.get("eos_token"));
    let id_of = |text: &Option<String>| text.as_deref().and_then(|t| hf.token_to_id(t));
    let generation_id = |key: &str| {
        generation.as_ref().and_then(|g| g.get(key)).and_then(Value::as_u64).and_then(|id| u32::try_from(id).ok())
    };
    let extra_end_tokens = generation_eos(generation.as_ref());
    let bos = id_of(&bos_text).or_else(|| generation_id("bos_token_id"));
    let eos = id_of(&eos_text).or_else(|| extra_end_tokens.first().copied());
    let unk = id_of(&token_text(config.get("unk_token")));

    // tokenizer_config.json's add_bos_token / add_eos_token, when given, decide; otherwise tokenizer.json's
    // post-processor does, and one encoding of the empty text shows what it adds.
    let config_add_bos = config.get("add_bos_token").and_then(Value::as_bool);
    let config_add_eos = config.get("add_eos_token").and_then(Value::as_bool);
    let post_processor = config_add_bos.is_none() && config_add_eos.is_none();
    let (add_bos, add_eos) = if post_processor {
        let probe = hf.encode_fast("", true).map_err(error("encoding the empty text"))?;
        let ids = probe.get_ids();
        (bos.is_some() && ids.first().copied() == bos, eos.is_some() && ids.last().copied() == eos)
    } else {
        (config_add_bos.unwrap_or(false), config_add_eos.unwrap_or(false))
    };

    let chat_template = match chat_template(&config, &config_path)? {
        Some(t) => Some(t),
        None => read(&dir.join("chat_template.jinja"))?.map(|b| String::from_utf8_lossy(&b).into_owned()),
    };

    Tokenizer::from_parts(Parts {
        texts,
        kinds,
        style,
        engine: EngineSpec::HuggingFace { hf: Box::new(hf), post_processor },
        bos,
        eos,
        eot: None,
        eom: None,
        unk,
        extra_end_tokens,
        add_bos,
        add_eos,
        space_prefix,
        chat_template,
        template_bos: bos_text,
        template_eos: eos_text,
    })
}

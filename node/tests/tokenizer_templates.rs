//! Chat templates of Llama-family models rendered with minijinja, compared with Python's jinja2 rendering them as
//! Hugging Face transformers does (`tests/fixtures/tokenizer_templates.json`, from
//! `scripts/make-tokenizer-fixtures.py`), including the conversations a template refuses with `raise_exception`.

use serde_json::Value;
use shardline_node::ModelError;
use shardline_node::tokenizer::{ChatMessage, ChatTemplate};

#[test]
fn templates_render_like_jinja2() {
    let fx: Value = serde_json::from_str(include_str!("fixtures/tokenizer_templates.json")).expect("fixture is JSON");
    let templates = fx["templates"].as_object().unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut refused = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let t = &templates[name];
        let template = ChatTemplate::new(
            t["source"].as_str().unwrap(),
            t["bos_token"].as_str().unwrap(),
            t["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"));
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let got = template.render(&messages, add);
        match (case["rendered"].as_str(), case["error"].as_str()) {
            (Some(expected), _) => {
                assert_eq!(got.unwrap(), expected, "{name} over {messages:?} (generation prompt {add})")
            }
            (None, Some(error)) => {
                refused += 1;
                match got {
                    Err(ModelError::ChatTemplate(message)) => assert!(message.contains(error), "{message}"),
                    other => panic!("{name} over {messages:?}: jinja2 refused with {error:?}, we gave {other:?}"),
                }
            }
            (None, None) => panic!("case without result"),
        }
    }
    assert!(refused > 0, "the fixture covers raise_exception");
}

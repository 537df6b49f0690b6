//! Fuzzing the HTTP API's request parsing (issue 13; figures in `docs/RELIABILITY.md`, "Fuzzing"): random bytes,
//! JSON documents built from the fields both endpoints read with values of every type and size (numbers beyond
//! `u64`, negative counts, deep nesting, unknown roles and content parts, token ids outside the vocabulary), and
//! valid requests with flipped bits and cut tails, sent through the real router of a coordinator serving the tiny
//! model with no node. At least 10^5 cases per property in the normal test run (`SHARDLINE_FUZZ_CASES` raises it).
//!
//! Each answer must be the request's fault (400, 404 for a model not served, 413, 422) or the honest "no route"
//! (503: no node serves a layer), always an OpenAI-shaped error body naming a message, and never a panic, a 500 or a
//! 502: nothing a client sends may pass for the server's or a node's fault.

#[path = "../../proto/tests/fuzz_common/mod.rs"]
mod fuzz_common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use shardline_coordinator::api::{self, ApiConfig, ApiState};
use shardline_coordinator::{CoordinatorArgs, CoordinatorHandle, start_coordinator};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};
use tower::ServiceExt;

/// Statuses a hostile body may get: its own fault, or no route (the swarm has no node).
const ALLOWED: [u16; 5] = [400, 404, 413, 422, 503];

/// A coordinator serving the tiny model's API with no node, and a runtime to drive its router from the property.
struct Server {
    /// How many answers of each status the property got, so it can show that its cases reach past the parser.
    seen: std::sync::Mutex<std::collections::BTreeMap<u16, usize>>,
    rt: tokio::runtime::Runtime,
    router: Router,
    _coordinator: CoordinatorHandle,
    _state: Arc<ApiState>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_gguf(&TinySpec { n_layers: 2, context: 256, ..TinySpec::default() }, &model).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (coordinator, state) = rt.block_on(async {
            let args = CoordinatorArgs::new(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()], vec![]);
            let coordinator = start_coordinator(args).await.unwrap();
            let state = ApiState::open(&coordinator, &[model.as_path()], ApiConfig::default()).unwrap();
            (coordinator, state)
        });
        let router = api::router(state.clone());
        Server { seen: Default::default(), rt, router, _coordinator: coordinator, _state: state, _dir: dir }
    }

    /// POSTs `body` to `path`; returns the status and the body.
    fn post(&self, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let req = axum::http::Request::post(path).header("content-type", "application/json").body(Body::from(body));
        self.rt.block_on(async {
            let r = self.router.clone().oneshot(req.unwrap()).await.unwrap();
            let status = r.status().as_u16();
            (status, r.into_body().collect().await.unwrap().to_bytes().to_vec())
        })
    }

    /// Answers of `status` so far.
    fn seen(&self, status: u16) -> usize {
        self.seen.lock().unwrap().get(&status).copied().unwrap_or(0)
    }

    /// Sends `body` to one endpoint and checks the answer; the error names the case on failure.
    fn check(&self, chat: bool, body: Vec<u8>) -> Result<(), TestCaseError> {
        let path = if chat { "/v1/chat/completions" } else { "/v1/completions" };
        let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        let (status, answer) = self.post(path, body);
        *self.seen.lock().unwrap().entry(status).or_default() += 1;
        prop_assert!(ALLOWED.contains(&status), "{path} answered {status} to {shown:?}: {}", lossy(&answer));
        let v: Value = serde_json::from_slice(&answer)
            .map_err(|e| TestCaseError::fail(format!("{status} with a non-JSON body ({e}): {}", lossy(&answer))))?;
        prop_assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "not an OpenAI error: {v}");
        prop_assert!(v["error"]["type"].is_string(), "not an OpenAI error: {v}");
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        eprintln!("answers by status: {:?}", self.seen.lock().map(|s| s.clone()).unwrap_or_default());
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned()
}

/// Any JSON value: scalars of every kind and size, and small arrays and objects of them.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |x| x.is_finite()).prop_map(Value::from),
        prop_oneof![Just(-1i64), Just(0), Just(1), Just(255), Just(256), Just(65_536), Just(u32::MAX as i64 + 1)]
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::from),
        Just(Value::from("tiny")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,12}", inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Field names besides [`OPTIONAL`]: the required ones, one the API ignores and some it does not know.
const OTHER: [&str; 7] = ["model", "prompt", "messages", "user", "role", "content", "tools"];

/// A message whose role and content are any of the expected shapes or anything else.
fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        Just(json!("system")),
        Just(json!("user")),
        Just(json!("assistant")),
        Just(json!("tool")),
        any_value()
    ];
    let part = prop_oneof![
        ".{0,16}".prop_map(|t| json!({"type": "text", "text": t})),
        Just(json!({"type": "image_url", "image_url": {"url": "x"}})),
        any_value(),
    ];
    let content = prop_oneof![
        ".{0,40}".prop_map(Value::from),
        prop::collection::vec(part, 0..4).prop_map(Value::Array),
        any_value(),
    ];
    (role, content).prop_map(|(role, content)| json!({"role": role, "content": content}))
}

/// A plausible value of field `name` (either endpoint's reading of it), sometimes at or past its limits.
fn plausible(name: &'static str) -> BoxedStrategy<Value> {
    match name {
        "max_tokens" | "max_completion_tokens" => {
            prop_oneof![4 => (0u64..300).prop_map(Value::from), 1 => any::<u64>().prop_map(Value::from)].boxed()
        }
        "temperature" | "top_p" | "presence_penalty" => (-1.0f64..3.0).prop_map(Value::from).boxed(),
        "top_k" | "top_logprobs" => (0u64..40).prop_map(Value::from).boxed(),
        "seed" => any::<u64>().prop_map(Value::from).boxed(),
        "n" => (0u64..3).prop_map(Value::from).boxed(),
        "stop" => {
            prop_oneof![".{0,4}".prop_map(Value::from), prop::collection::vec(".{0,4}", 0..3).prop_map(|v| json!(v))]
                .boxed()
        }
        "stream_options" => any::<bool>().prop_map(|b| json!({"include_usage": b})).boxed(),
        "logprobs" => prop_oneof![any::<bool>().prop_map(Value::from), (0u64..8).prop_map(Value::from)].boxed(),
        "user" => ".{0,8}".prop_map(Value::from).boxed(),
        _ => any::<bool>().prop_map(Value::from).boxed(),
    }
}

/// Fields both endpoints read besides the model and the prompt or messages.
const OPTIONAL: [&str; 15] = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "ignore_eos",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "presence_penalty",
];

/// One optional field: a plausible value most of the time, any JSON value otherwise (also under names the API
/// does not know).
fn field() -> impl Strategy<Value = (String, Value)> {
    prop_oneof![
        6 => prop::sample::select(OPTIONAL.to_vec()).prop_flat_map(|k| plausible(k).prop_map(move |v| (k.to_string(), v))),
        1 => (prop::sample::select([&OPTIONAL[..], &OTHER[..]].concat()), any_value())
            .prop_map(|(k, v)| (k.to_string(), v)),
    ]
}

/// A request object: the model named right most of the time, a prompt and messages of the expected shapes most of
/// the time (each field left out now and then), and up to four more fields.
fn request() -> impl Strategy<Value = Value> {
    let model = prop_oneof![12 => Just(json!("tiny")), 1 => ".{0,12}".prop_map(Value::from), 1 => any_value()];
    let prompt = prop_oneof![
        3 => ".{0,64}".prop_map(Value::from),
        3 => prop::collection::vec(0u32..300, 1..24).prop_map(|t| json!(t)),
        1 => prop::collection::vec(0u32..400, 0..24).prop_map(|t| json!(t)),
        1 => prop::collection::vec(".{0,8}", 0..3).prop_map(|t| json!(t)),
        1 => any_value(),
    ];
    let plain = (prop::sample::select(vec!["system", "user", "assistant"]), ".{0,40}")
        .prop_map(|(role, text)| json!({"role": role, "content": text}));
    let messages = prop_oneof![
        4 => prop::collection::vec(plain, 1..4),
        1 => prop::collection::vec(message(), 0..4),
    ];
    (model, prompt, messages, prop::collection::vec(field(), 0..4), any::<u8>()).prop_map(
        |(model, prompt, messages, fields, drop)| {
            let mut o = serde_json::Map::new();
            if drop % 16 != 0 {
                o.insert("model".into(), model);
            }
            if drop % 16 != 1 {
                o.insert("prompt".into(), prompt);
            }
            if drop % 16 != 2 {
                o.insert("messages".into(), Value::Array(messages));
            }
            for (k, v) in fields {
                o.insert(k, v);
            }
            Value::Object(o)
        },
    )
}

/// Valid requests of both endpoints, the starting points of the mutation property.
fn valid(chat: bool, n: u8) -> Vec<u8> {
    let v = if chat {
        json!({"model": "tiny", "max_tokens": n, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stream": n.is_multiple_of(2),
               "logprobs": true, "top_logprobs": 2, "stop": ["\n"],
               "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]})
    } else {
        json!({"model": "tiny", "prompt": "The capital of France is", "max_tokens": n, "logprobs": 1,
               "echo": true, "stream": n % 2 == 1, "stream_options": {"include_usage": true}})
    };
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn random_bytes_are_refused_as_the_requests_fault() {
    let server = Server::start();
    proptest!(fuzz_common::config(), |(chat in any::<bool>(), body in prop::collection::vec(any::<u8>(), 0..256))| {
        server.check(chat, body)?;
    });
}

#[test]
fn any_json_in_the_fields_the_api_reads_is_refused_or_finds_no_route() {
    let server = Server::start();
    proptest!(fuzz_common::config(), |(chat in any::<bool>(), req in request())| {
        server.check(chat, serde_json::to_vec(&req).unwrap())?;
    });
    // The generator reaches every layer of checking: refused fields, an unknown model, and requests that pass every
    // check and find no route.
    let cases = fuzz_common::config().cases as usize;
    for status in [400, 404, 503] {
        assert!(server.seen(status) * 50 > cases, "only {} of {cases} answers were {status}", server.seen(status));
    }
}

#[test]
fn valid_requests_with_flipped_bits_and_cut_tails_are_refused_or_find_no_route() {
    let server = Server::start();
    proptest!(fuzz_common::config(), |(
        chat in any::<bool>(),
        n in any::<u8>(),
        flips in prop::collection::vec((any::<usize>(), 1u8..), 0..4),
        keep in prop::option::of(0usize..400),
    )| {
        server.check(chat, fuzz_common::mutate(valid(chat, n), &flips, keep))?;
    });
    let cases = fuzz_common::config().cases as usize;
    assert!(server.seen(503) * 50 > cases, "only {} of {cases} mutated requests passed the checks", server.seen(503));
}

#[test]
fn deep_nesting_and_huge_numbers_are_clear_errors() {
    let server = Server::start();
    let deep = |open: &str, close: &str, n: usize| {
        format!("{{\"model\":\"tiny\",\"prompt\":{}{}}}", open.repeat(n), close.repeat(n))
    };
    for body in [
        deep("[", "]", 100_000),
        deep("{\"a\":", "}", 50_000),
        r#"{"model":"tiny","prompt":"hi","max_tokens":18446744073709551615}"#.to_string(),
        r#"{"model":"tiny","prompt":"hi","max_tokens":1e400}"#.to_string(),
        r#"{"model":"tiny","prompt":[4294967296]}"#.to_string(),
        r#"{"model":"tiny","prompt":[[1,2],[3]]}"#.to_string(),
        r#"{"model":"tiny","prompt":"hi","logprobs":18446744073709551615}"#.to_string(),
        r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"top_logprobs":4294967296,"logprobs":true}"#
            .to_string(),
    ] {
        for chat in [false, true] {
            server.check(chat, body.clone().into_bytes()).unwrap();
        }
    }
}

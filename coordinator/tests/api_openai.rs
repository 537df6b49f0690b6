//! The OpenAI-compatible HTTP API against a real in-process swarm on a tiny model: a coordinator serving the API and
//! three nodes on loopback. Completions and chat give exactly the text of the single-process engine (greedy and
//! sampled), streamed or not, and the same log-probabilities streamed or not; errors have the OpenAI shape and
//! status; a client that disconnects mid-stream ends its session and every stage frees its KV cache; missing layers
//! give 503 naming them; full queues give 429.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{api, assert_stages_idle, cpu, post, three_stages_behind, wait_registered};
use futures::StreamExt;
use libp2p::Multiaddr;
use serde_json::{Value, json};
use shardline_coordinator::api::ApiConfig;
use shardline_kernels::SamplingParams;
use shardline_node::engine::{Engine, stop_tokens};
use shardline_node::generate::GenerateParams;
use shardline_node::model::{LayerRange, ShardOptions};
use shardline_node::stage::NodeHandle;
use shardline_node::test_models::TinySpec;
use shardline_node::tokenizer::ChatMessage;

const N_LAYERS: usize = 6;
const CONTEXT: usize = 2048;

fn tiny_model(dir: &Path) -> PathBuf {
    common::tiny_model(dir, &TinySpec { n_layers: N_LAYERS, context: CONTEXT, ..TinySpec::default() }).0
}

async fn node(model: &Path, layers: LayerRange, bootstrap: &[Multiaddr], max_sessions: usize) -> NodeHandle {
    common::node_on(model, layers, bootstrap, |a| a.stage.max_sessions = max_sessions).await
}

/// Status and JSON body of a request expected to fail; checks the OpenAI error shape.
async fn error_of(base: &str, path: &str, body: &str) -> (u16, Value) {
    let r = post(base, path, body).await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "not an OpenAI error: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "not an OpenAI error: {v}");
    (status, v)
}

/// The `data:` payloads of a whole SSE response.
async fn sse_data(r: reqwest::Response) -> Vec<String> {
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let body = r.text().await.unwrap();
    body.split("\n\n").filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: "))).map(String::from).collect()
}

/// What the single-process engine generates for `prompt` with the API's defaults.
fn engine_text(engine: &Engine, prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> (String, usize) {
    let params = GenerateParams {
        max_tokens,
        sampling,
        stop_tokens: stop_tokens(engine.tokenizer()),
        ..GenerateParams::default()
    };
    let g = engine.generate(prompt, &params, &mut |_| true).unwrap();
    (g.text, g.tokens.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_endpoints_match_the_engine_and_free_stages_on_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let api = api(&model, 16, ApiConfig::default()).await;
    let [a, b, c] = three_stages_behind(&api, &model, 16).await;
    let nodes = [&a, &b, &c];
    let base = api.base.as_str();
    let engine = Engine::load(&model, cpu(1), &[], ShardOptions::default(), &mut |_, _| {}).unwrap();
    let name = "tiny";

    // Health and models: fully covered.
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    let models: Value = reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], name);
    assert_eq!(models["data"][0]["coverage"]["routable"], true);
    assert_eq!(models["partial"].as_array().unwrap().len(), 0);

    // Completions, token prompt, greedy: the engine's text and token counts.
    let prompt: Vec<u32> = vec![1, 40, 41, 42, 100, 200, 7, 9];
    let (want, n_gen) = engine_text(&engine, &prompt, 12, SamplingParams::GREEDY);
    assert!(n_gen > 0 && !want.is_empty(), "the reference generated nothing to compare");
    let body = json!({"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 2});
    let r = post(base, "/v1/completions", &body.to_string()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], n_gen);
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + n_gen);
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n_gen);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    // Greedy: the sampled token is the most likely one.
    let top_best =
        lp["top_logprobs"][0].as_object().unwrap().values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert!((lp["token_logprobs"][0].as_f64().unwrap() - top_best).abs() < 1e-5, "{lp}");
    let finish = if n_gen < 12 { "stop" } else { "length" };
    assert_eq!(v["choices"][0]["finish_reason"], finish);

    // The same, streamed: the pieces add up to the same text; the usage chunk and [DONE] close the stream.
    let body = json!({"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}});
    let data = sse_data(post(base, "/v1/completions", &body.to_string()).await).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, want);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], n_gen);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], finish);

    // Streamed with logprobs: the chunks' log-probabilities, joined, are exactly the unstreamed ones; with echo (text
    // offsets count the prompt), and with a stop string (the token completing it brings no text, so its entry comes
    // with the last chunk).
    let body = json!({"model": name, "prompt": "hello world", "max_tokens": 12, "temperature": 0, "logprobs": 3,
        "echo": true});
    let whole: Value = post(base, "/v1/completions", &body.to_string()).await.json().await.unwrap();
    let generated = whole["choices"][0]["text"].as_str().unwrap().strip_prefix("hello world").unwrap().to_string();
    // A character of the generated text, not its first, that does not occur before: the stop cuts the text there.
    let chars: Vec<char> = generated.chars().collect();
    let at = (1..chars.len()).find(|&i| !chars[..i].contains(&chars[i]));
    let stop = chars[at.unwrap_or_else(|| panic!("no stop string to pick from {generated:?}"))].to_string();
    let with_stop = json!({"model": name, "prompt": "hello world", "max_tokens": 12, "temperature": 0, "logprobs": 1,
        "stop": stop});
    for body in [body, with_stop] {
        let whole: Value = post(base, "/v1/completions", &body.to_string()).await.json().await.unwrap();
        let want_lp = &whole["choices"][0]["logprobs"];
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let data = sse_data(post(base, "/v1/completions", &streamed.to_string()).await).await;
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let mut joined = json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
        let mut with_logprobs = 0;
        for lp in chunks.iter().map(|c| &c["choices"][0]["logprobs"]).filter(|lp| !lp.is_null()) {
            with_logprobs += 1;
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                joined[key].as_array_mut().unwrap().extend(lp[key].as_array().unwrap().iter().cloned());
            }
        }
        assert_eq!(&joined, want_lp, "{body}");
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
        let finish = &chunks.iter().rev().find(|c| !c["choices"][0]["finish_reason"].is_null()).unwrap()["choices"][0];
        assert_eq!(finish["finish_reason"], whole["choices"][0]["finish_reason"]);
        if body.get("echo").is_some() {
            assert!(want_lp["tokens"].as_array().unwrap().len() >= 2, "too few tokens to compare: {whole}");
            assert!(with_logprobs >= 2, "log-probabilities were not streamed with the text: {chunks:?}");
            assert_eq!(want_lp["text_offset"][0], "hello world".len());
        } else {
            assert!(with_logprobs >= 1, "no log-probabilities streamed: {chunks:?}");
            assert_eq!(whole["choices"][0]["finish_reason"], "stop", "{whole}");
        }
    }

    // One token: the first text event is followed at once by the end (nothing may be lost between them).
    let (one, _) = engine_text(&engine, &prompt, 1, SamplingParams::GREEDY);
    let body = json!({"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0});
    let v: Value = post(base, "/v1/completions", &body.to_string()).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], one.as_str(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 1);

    // Echo puts the prompt text first.
    let body = json!({"model": name, "prompt": "hello world", "max_tokens": 4, "temperature": 0, "echo": true});
    let v: Value = post(base, "/v1/completions", &body.to_string()).await.json().await.unwrap();
    assert!(v["choices"][0]["text"].as_str().unwrap().starts_with("hello world"), "{v}");

    // Chat, sampled with a seed: the prompt goes through the model's chat template; same text as the engine.
    let sampled = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 77 };
    let chat_prompt = engine
        .tokenizer()
        .encode(
            &engine
                .tokenizer()
                .apply_chat_template(&[ChatMessage::system("be brief"), ChatMessage::user("hi there")], true)
                .unwrap(),
            false,
        )
        .unwrap();
    let (want, n_gen) = engine_text(&engine, &chat_prompt, 10, sampled);
    assert!(n_gen > 0 && !want.is_empty(), "the reference generated nothing to compare");
    let body = json!({"model": name, "max_tokens": 10, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 77,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]});
    let r = post(base, "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], chat_prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], n_gen);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let data = sse_data(post(base, "/v1/chat/completions", &streamed.to_string()).await).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none()));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, want);
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // Chat logprobs, greedy, streamed and not: the same tokens, log-probabilities and alternatives.
    let body = json!({"model": name, "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "hi there"}]});
    let whole: Value = post(base, "/v1/chat/completions", &body.to_string()).await.json().await.unwrap();
    let want_lp = whole["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert!(want_lp.len() >= 2, "too few tokens to compare: {whole}");
    assert_eq!(want_lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let data = sse_data(post(base, "/v1/chat/completions", &streamed.to_string()).await).await;
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let parts: Vec<&Vec<Value>> =
        chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).collect();
    assert!(parts.len() >= 2, "log-probabilities were not streamed with the text: {chunks:?}");
    let joined: Vec<Value> = parts.into_iter().flatten().cloned().collect();
    assert_eq!(joined, want_lp);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());

    // Errors: OpenAI shape and status.
    let (s, _) = error_of(base, "/v1/chat/completions", "{not json").await;
    assert_eq!(s, 400);
    let (s, _) =
        error_of(base, "/v1/completions", &json!({"model": name, "prompt": "x", "max_tokens": "5"}).to_string()).await;
    assert_eq!(s, 400);
    let (s, v) =
        error_of(base, "/v1/completions", &json!({"model": name, "prompt": "x", "max_tokens": CONTEXT}).to_string())
            .await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("context_length_exceeded")));
    let (s, v) = error_of(
        base,
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string(),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("model_not_found")));
    let (s, v) = error_of(base, "/v1/completions", &json!({"model": name, "prompt": "x", "n": 2}).to_string()).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("n")));
    let (s, _) = error_of(base, "/v1/completions", &json!({"model": name, "prompt": [100000]}).to_string()).await;
    assert_eq!(s, 400);
    assert_stages_idle(&nodes).await;

    // A client that disconnects mid-stream: the generation stops and every stage frees the session.
    let body = json!({"model": name, "prompt": prompt, "max_tokens": CONTEXT - prompt.len(), "ignore_eos": true,
        "temperature": 0, "stream": true});
    let r = post(base, "/v1/completions", &body.to_string()).await;
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let first = bytes.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    assert!(nodes.iter().all(|n| n.server().active_sessions() == 1), "the stream's session runs on every stage");
    drop(bytes);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.state.metrics.cancelled() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the generation was not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_stages_idle(&nodes).await;

    // Metrics and the swarm view.
    let m = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(m.contains("shardline_requests_total{endpoint=\"completions\",status=\"200\"}"), "{m}");
    assert!(m.contains("shardline_requests_total{endpoint=\"completions\",status=\"400\"}"), "{m}");
    assert!(m.contains("shardline_cancelled_total 1"), "{m}");
    assert!(m.contains("shardline_registered_nodes 3"), "{m}");
    assert!(m.contains("shardline_time_to_first_token_seconds_count"), "{m}");
    let s: Value = reqwest::get(format!("{base}/v1/swarm")).await.unwrap().json().await.unwrap();
    let nodes_json = s["models"][0]["nodes"].as_array().unwrap();
    let layers: Vec<&str> = nodes_json.iter().map(|n| n["layers"].as_str().unwrap()).collect();
    assert_eq!(layers, vec!["0..2", "2..4", "4..6"]);
    assert_eq!(s["models"][0]["missing"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_layers_give_503_and_full_queues_give_429() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = ApiConfig { admit_wait: Duration::from_millis(200), retry_after_secs: 2, ..ApiConfig::default() };
    let api = api(&model, 0, config).await;
    let boot = api.coordinator.p2p_addrs.clone();
    let a = node(&model, LayerRange::new(0, 2), &boot, 4).await;
    let c = node(&model, LayerRange::new(4, 6), &boot, 4).await;
    wait_registered(&api.coordinator, &[&a, &c]).await;
    let base = api.base.as_str();
    let chat = json!({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).to_string();

    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(r.status(), 503);
    let models: Value = reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 0);
    assert_eq!(models["partial"][0]["coverage"]["missing"], json!(["2..4"]));
    let (s, v) = error_of(base, "/v1/chat/completions", &chat).await;
    assert_eq!(s, 503);
    assert!(v["error"]["message"].as_str().unwrap().contains("2..4"), "{v}");
    let mut streamed: Value = serde_json::from_str(&chat).unwrap();
    streamed["stream"] = json!(true);
    let (s, _) = error_of(base, "/v1/chat/completions", &streamed.to_string()).await;
    assert_eq!(s, 503, "a stream that cannot start is refused with a status, not an event");

    // The missing node arrives: requests go through.
    let b = node(&model, LayerRange::new(2, 4), &boot, 4).await;
    wait_registered(&api.coordinator, &[&b]).await;
    assert_eq!(reqwest::get(format!("{base}/health")).await.unwrap().status(), 200);
    let r = post(base, "/v1/chat/completions", &chat).await;
    assert_eq!(r.status(), 200);

    // Every slot of the middle node taken, no waiting line: 429 with Retry-After.
    let entry = api.coordinator.registry.get(&b.peer_id).unwrap();
    let mut held = Vec::new();
    while let Ok(p) = entry.queue.try_admit() {
        held.push(p);
    }
    // The node admits 4 sessions and announces what one owner may hold: 3 (docs/PROTOCOL.md, *Quotas*).
    assert_eq!(held.len(), 3);
    let r = post(base, "/v1/chat/completions", &chat).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop(held);
    assert_eq!(post(base, "/v1/chat/completions", &chat).await.status(), 200);
    let m = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(m.contains("shardline_route_failures_total 2"), "{m}");
    assert!(m.contains("shardline_rejected_busy_total 1"), "{m}");
    assert_stages_idle(&[&a, &b, &c]).await;
}

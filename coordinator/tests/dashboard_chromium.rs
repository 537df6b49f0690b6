//! The dashboard (`GET /`) and its event stream (`GET /v1/swarm/events`) without a browser; then the page in headless
//! Chromium, driven over the DevTools protocol, against a real in-process swarm on a tiny model whose file name holds
//! markup: the coverage bar shows every node and the uncovered layers in red, and updates live when the missing node
//! arrives; the node table lists every node; a chat message typed into the page streams back exactly the text the
//! single-process engine generates, in several chunks; the request and token rates count it, and the 10-minute
//! throughput chart draws it; no server or user string becomes markup.
//!
//! Needs a Chromium (or Chrome) binary: `SHARDLINE_CHROMIUM`, else `chromium`, `chromium-browser`, `google-chrome`
//! or `google-chrome-stable` on `PATH`. Without one the test prints why it is skipped and passes, unless
//! `SHARDLINE_REQUIRE_CHROMIUM=1` (CI), where it fails. `SHARDLINE_DASHBOARD_SCREENSHOT=file.png` saves the final
//! page.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::page::{Page, ScreenshotParams};
use futures::StreamExt;
use libp2p::Multiaddr;
use serde::de::DeserializeOwned;
use serde_json::Value;
use shardline_coordinator::api::{self, ApiConfig, ApiState};
use shardline_coordinator::{CoordinatorArgs, CoordinatorHandle, start_coordinator};
use shardline_kernels::SamplingParams;
use shardline_kernels::cpu::CpuBackend;
use shardline_node::engine::{Engine, stop_tokens};
use shardline_node::generate::GenerateParams;
use shardline_node::model::{LayerRange, ShardOptions};
use shardline_node::stage::{NodeArgs, NodeHandle, start_node};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};
use shardline_node::tokenizer::ChatMessage;

const N_LAYERS: usize = 6;
/// The served model's name: the file name, with markup the page must show as text.
const MODEL_NAME: &str = "tiny<i>x";
const MAX_TOKENS: usize = 16;

/// Replaces the page's `EventSource` with one whose connection is refused at once (as a proxy that does not pass
/// server-sent events would).
const REFUSED_EVENT_SOURCE: &str = "window.EventSource = class extends EventTarget { \
    constructor() { super(); this.readyState = 2; setTimeout(() => this.dispatchEvent(new Event('error')), 0); } \
    close() {} }; window.EventSource.CLOSED = 2;";

/// The browser to drive, if there is one.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHARDLINE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

async fn node(model: &Path, layers: LayerRange, bootstrap: &[Multiaddr]) -> NodeHandle {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut args = NodeArgs::new(model.to_path_buf(), layers, Arc::new(CpuBackend::new(1)), listen);
    args.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    args.bootstrap = bootstrap.to_vec();
    args.measure_tokens = 4;
    start_node(args).await.unwrap()
}

/// A coordinator on loopback serving `model`'s API; returns it with the API's base URL.
async fn serve(model: &Path) -> (CoordinatorHandle, String) {
    let mut args = CoordinatorArgs::new(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()], vec![]);
    args.discovery.query_interval = Duration::from_millis(300);
    let coordinator = start_coordinator(args).await.unwrap();
    let state = ApiState::open(&coordinator, &[model], ApiConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api::serve(listener, state));
    (coordinator, base)
}

async fn wait_registered(c: &CoordinatorHandle, nodes: &[&NodeHandle]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| c.registry.contains(&n.peer_id)) {
        assert!(tokio::time::Instant::now() < deadline, "coordinator did not register every node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Evaluates `js` in the page; the expression must give a JSON-serialisable value.
async fn eval<T: DeserializeOwned>(page: &Page, js: &str) -> T {
    let v = page.evaluate(js).await.unwrap_or_else(|e| panic!("evaluating `{js}`: {e}"));
    v.into_value().unwrap_or_else(|e| panic!("value of `{js}`: {e}"))
}

/// Waits until the boolean expression `js` holds in the page.
async fn wait_for(page: &Page, js: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !eval::<bool>(page, js).await {
        assert!(tokio::time::Instant::now() < deadline, "the page never showed {what} (`{js}`)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Peer ids shown in the coverage bar.
async fn coverage_nodes(page: &Page) -> BTreeSet<String> {
    eval(page, "Array.from(document.querySelectorAll('#coverage [data-node]'), e => e.dataset.node)").await
}

/// Picks, of a few user messages, the one the reference engine answers greedily with the most tokens (a random tiny
/// model may end a reply at once), and returns it with that reply's text and token count.
fn reference_reply(engine: &Engine) -> (String, String, usize) {
    let tok = engine.tokenizer();
    let params = GenerateParams {
        max_tokens: MAX_TOKENS,
        sampling: SamplingParams::GREEDY,
        stop_tokens: stop_tokens(tok),
        ..GenerateParams::default()
    };
    let best = [
        "hello <img src=x onerror=\"window.pwned=1\"> & bye",
        "tell me <b>more</b>",
        "a <script>window.pwned=1</script> b",
        "<u>1</u> < 2",
    ]
    .into_iter()
    .map(|msg| {
        let prompt = tok.encode(&tok.apply_chat_template(&[ChatMessage::user(msg)], true).unwrap(), false).unwrap();
        let g = engine.generate(&prompt, &params, &mut |_| true).unwrap();
        (msg.to_string(), g.text, g.tokens.len())
    })
    .max_by_key(|(_, _, n)| *n)
    .unwrap();
    assert!(best.2 >= 3 && !best.1.is_empty(), "the tiny model ends every candidate reply at once: {best:?}");
    best
}

/// The `data:` payload of the next whole event on an SSE byte stream.
async fn next_event<B: AsRef<[u8]>>(
    body: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    buf: &mut String,
) -> Value {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event.lines().find_map(|l| l.strip_prefix("data: ")).expect("an event without data");
            assert!(event.lines().any(|l| l == "event: swarm"), "unnamed event: {event}");
            return serde_json::from_str(data).unwrap();
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next()).await.expect("no event within 5 s");
        buf.push_str(&String::from_utf8_lossy(chunk.unwrap().unwrap().as_ref()));
    }
}

/// Without a browser: the page is served with its security headers, and the event stream pushes the swarm view at
/// once, again when a node registers, and periodically while nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_event_stream_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec { n_layers: N_LAYERS, context: 1024, ..TinySpec::default() }, &model).unwrap();
    let (coordinator, base) = serve(&model).await;

    let r = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("connect-src 'self'"));
    let html = r.text().await.unwrap();
    for id in ["coverage", "nodes", "rates", "history-chart", "chat-input", "chat-send", "chat-output"] {
        assert!(html.contains(&format!("id=\"{id}\"")), "the page lacks #{id}");
    }

    let r = reqwest::get(format!("{base}/v1/swarm/events")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let (mut body, mut buf) = (r.bytes_stream(), String::new());
    let first = next_event(&mut body, &mut buf).await;
    assert_eq!(first["registered_nodes"], 0);
    assert_eq!(first["served"], serde_json::json!(["tiny"]));
    assert_eq!(
        first["rates"]["requests"].as_array().unwrap().len(),
        first["rates"]["window_s"].as_u64().unwrap() as usize
    );
    let a = node(&model, LayerRange::new(0, 4), &coordinator.p2p_addrs).await;
    let started = tokio::time::Instant::now();
    let seen = loop {
        let v = next_event(&mut body, &mut buf).await;
        if v["registered_nodes"] == 1 {
            break v;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the new node never appeared in the stream");
    };
    let m = &seen["models"][0];
    assert_eq!(m["nodes"][0]["peer_id"], a.peer_id.to_string());
    assert_eq!((m["nodes"][0]["layer_start"].as_u64(), m["nodes"][0]["layer_end"].as_u64()), (Some(0), Some(4)));
    assert_eq!(m["missing"], serde_json::json!(["4..6"]));
    // Nothing changes now: the view still comes about every second.
    let quiet = tokio::time::Instant::now();
    next_event(&mut body, &mut buf).await;
    next_event(&mut body, &mut buf).await;
    assert!(quiet.elapsed() < Duration::from_secs(4), "periodic pushes stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_swarm_live_and_streams_chat() {
    let Some(chromium) = chromium() else {
        if std::env::var("SHARDLINE_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
            panic!("chromium not found (SHARDLINE_REQUIRE_CHROMIUM=1): install it or set SHARDLINE_CHROMIUM");
        }
        println!("skipped: chromium not found (set SHARDLINE_CHROMIUM or install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(format!("{MODEL_NAME}.gguf"));
    write_tiny_gguf(&TinySpec { n_layers: N_LAYERS, context: 1024, ..TinySpec::default() }, &model).unwrap();
    let engine =
        Engine::load(&model, Arc::new(CpuBackend::new(1)), &[], ShardOptions::default(), &mut |_, _| {}).unwrap();
    let (message, want, n_gen) = reference_reply(&engine);

    let (coordinator, base) = serve(&model).await;
    let boot = coordinator.p2p_addrs.clone();
    let a = node(&model, LayerRange::new(0, 2), &boot).await;
    let c = node(&model, LayerRange::new(4, 6), &boot).await;
    wait_registered(&coordinator, &[&a, &c]).await;

    let profile = tempfile::tempdir().unwrap();
    let config = BrowserConfig::builder()
        .chrome_executable(&chromium)
        .no_sandbox()
        .new_headless_mode()
        .user_data_dir(profile.path())
        .window_size(1280, 800)
        .viewport(None)
        .args(["--disable-gpu", "--disable-dev-shm-usage"])
        .launch_timeout(Duration::from_secs(60))
        .request_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (mut browser, mut handler) = Browser::launch(config).await.unwrap();
    let events = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser.new_page(format!("{base}/")).await.unwrap();

    // Two of three nodes: both in the bar, layers 2..4 shown as a red gap; the model name is text, not markup.
    wait_for(&page, "document.querySelector('#coverage [data-gap=\"2..4\"]') !== null", "the gap 2..4").await;
    let want_nodes: BTreeSet<String> = [&a, &c].iter().map(|n| n.peer_id.to_string()).collect();
    assert_eq!(coverage_nodes(&page).await, want_nodes);
    let gap_colour: String =
        eval(&page, "getComputedStyle(document.querySelector('#coverage [data-gap]')).backgroundColor").await;
    assert_eq!(gap_colour, "rgb(211, 60, 60)", "the gap is not red");
    let name: String = eval(&page, "document.querySelector('#coverage .model-name').textContent").await;
    assert_eq!(name, MODEL_NAME);
    assert!(eval::<bool>(&page, "document.querySelector('#coverage i, #nodes i') === null").await);

    // The missing node arrives: the page updates by itself over the event stream.
    let b = node(&model, LayerRange::new(2, 4), &boot).await;
    wait_registered(&coordinator, &[&b]).await;
    wait_for(&page, "document.querySelectorAll('#coverage [data-node]').length === 3", "three nodes").await;
    let want_nodes: BTreeSet<String> = [&a, &b, &c].iter().map(|n| n.peer_id.to_string()).collect();
    assert_eq!(coverage_nodes(&page).await, want_nodes);
    assert!(eval::<bool>(&page, "document.querySelector('#coverage [data-gap]') === null").await);
    let layers: Vec<String> =
        eval(&page, "Array.from(document.querySelectorAll('#nodes tr[data-node]'), tr => tr.children[2].textContent)")
            .await;
    assert_eq!(layers, vec!["0..2", "2..4", "4..6"]);
    let mode: String = eval(&page, "document.getElementById('conn').dataset.mode").await;
    assert_eq!(mode, "live", "updates did not come over server-sent events");
    let model_choice: String = eval(&page, "document.getElementById('chat-model').value").await;
    assert_eq!(model_choice, MODEL_NAME);

    // Chat, greedy: typed into the page, streamed back in several chunks, the engine's text exactly.
    eval::<String>(
        &page,
        &format!(
            "document.getElementById('chat-temperature').value = '0'; \
             document.getElementById('chat-max-tokens').value = '{MAX_TOKENS}'"
        ),
    )
    .await;
    page.find_element("#chat-input").await.unwrap().click().await.unwrap().type_str(&message).await.unwrap();
    let typed: String = eval(&page, "document.getElementById('chat-input').value").await;
    assert_eq!(typed, message);
    page.find_element("#chat-send").await.unwrap().click().await.unwrap();
    let reply_js = "(document.querySelector('#chat-output .assistant .text') || {}).textContent || ''";
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state: String = eval(&page, "document.getElementById('chat-output').dataset.state").await;
        seen.push(eval::<String>(&page, reply_js).await.len());
        if state == "done" || state == "error" {
            assert_eq!(state, "done", "the chat failed: {}", eval::<String>(&page, reply_js).await);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the reply never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply: String = eval(&page, reply_js).await;
    assert_eq!(reply, want, "streamed reply differs from the engine's text");
    let chunks: String = eval(&page, "document.getElementById('chat-output').dataset.chunks").await;
    let chunks: usize = chunks.parse().unwrap();
    assert!(chunks >= 2, "the reply came in {chunks} chunk(s), not streamed");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "the reply shrank while streaming: {seen:?}");
    println!("reply {reply:?} ({n_gen} tokens) in {chunks} chunks; lengths observed while streaming: {seen:?}");
    let user: String = eval(&page, "document.querySelector('#chat-output .user .text').textContent").await;
    assert_eq!(user, message);
    let tags: BTreeSet<String> =
        eval(&page, "Array.from(document.querySelectorAll('#chat-output *'), e => e.tagName.toLowerCase())").await;
    assert_eq!(tags, BTreeSet::from(["div".to_string(), "span".to_string()]), "chat text became markup");
    assert!(eval::<bool>(&page, "window.pwned === undefined").await);

    // The rates count the request and its tokens, in the API and on the page.
    wait_for(
        &page,
        &format!("document.getElementById('rates').dataset.tokens === '{n_gen}'"),
        "the generated tokens in the rates",
    )
    .await;
    let requests: String = eval(&page, "document.getElementById('rates').dataset.requests").await;
    assert_eq!(requests, "1");
    let shown: String = eval(&page, "document.getElementById('rate-tokens').textContent").await;
    assert!(shown.parse::<f64>().unwrap() > 0.0, "tokens/s shows {shown}");
    let swarm: Value = reqwest::get(format!("{base}/v1/swarm")).await.unwrap().json().await.unwrap();
    let sum = |k: &str| swarm["rates"][k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("requests"), sum("tokens")), (1, n_gen as u64));

    // The 10-minute chart draws the same counts: both lines reach the top of the box at the API's peak rate, the
    // peaks written beside it are the API's, and the line spans the whole width (oldest bucket left, now right).
    wait_for(
        &page,
        &format!("document.getElementById('history').dataset.tokens === '{n_gen}'"),
        "the generated tokens in the chart",
    )
    .await;
    let history = &swarm["history"];
    let bucket_s = history["bucket_s"].as_f64().unwrap();
    assert_eq!((bucket_s, history["window_s"].as_u64()), (10.0, Some(600)));
    for (series, digits) in [("tokens", 1), ("requests", 2)] {
        let counts: Vec<f64> = history[series].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(counts.len(), 60);
        let peak = counts.iter().cloned().fold(0.0, f64::max) / bucket_s;
        let shown: String = eval(&page, &format!("document.getElementById('history-{series}-peak').textContent")).await;
        assert_eq!(shown, format!("{peak:.digits$}"), "peak {series}/s on the chart");
        let points: String =
            eval(&page, &format!("document.getElementById('history-{series}').getAttribute('points')")).await;
        let xy: Vec<(f64, f64)> = points
            .split(' ')
            .map(|p| p.split_once(',').map(|(x, y)| (x.parse().unwrap(), y.parse().unwrap())).unwrap())
            .collect();
        assert_eq!(xy.len(), 60, "{series}: {points}");
        assert_eq!((xy[0].0, xy[59].0), (0.0, 600.0));
        let top = xy.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert_eq!(top, 2.0, "the {series} line reaches the top of the chart at its peak");
        let drawn_peaks = xy.iter().zip(&counts).filter(|(p, c)| p.1 == 2.0 && **c / bucket_s == peak).count();
        assert!(drawn_peaks >= 1, "the {series} line's highest point is not the busiest bucket: {points}");
    }

    // A browser whose event stream is refused: the page falls back to polling and still shows the swarm.
    let polled = browser.new_page("about:blank").await.unwrap();
    polled.evaluate_on_new_document(REFUSED_EVENT_SOURCE).await.unwrap();
    polled.goto(format!("{base}/")).await.unwrap();
    wait_for(&polled, "document.querySelectorAll('#coverage [data-node]').length === 3", "three nodes by polling")
        .await;
    assert_eq!(coverage_nodes(&polled).await, want_nodes);
    let mode: String = eval(&polled, "document.getElementById('conn').dataset.mode").await;
    assert_eq!(mode, "polling");

    if let Some(path) = std::env::var_os("SHARDLINE_DASHBOARD_SCREENSHOT") {
        page.save_screenshot(ScreenshotParams::builder().full_page(true).build(), path).await.unwrap();
    }
    browser.close().await.unwrap();
    let _ = browser.wait().await;
    events.abort();
}

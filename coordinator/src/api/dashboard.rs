//! `GET /`: the dashboard, one self-contained page (HTML, CSS and vanilla JavaScript, no build step) kept in
//! `dashboard.html` and compiled into the binary. It shows each model's layer coverage and the node table, updated
//! live from `GET /v1/swarm/events` (polling `GET /v1/swarm` when the event stream fails), the recent request and
//! token rates, and a chat box that streams replies through `POST /v1/chat/completions`. The page puts every string
//! from the server or the user into the DOM as text, never as markup.

use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};

const PAGE: &str = include_str!("dashboard.html");

/// The page may only run its own inline script and style and talk to this origin.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`.
pub async fn page() -> Response {
    let mut r = Html(PAGE).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

//! The web console at `/ui/` (§11.1): three static files compiled into the binary, so every
//! node serves it in any state (sealed, read-only) and it loads nothing from elsewhere.
//!
//! The console is a client of the `/v1/` API like any other: it holds the operator's token in
//! the browser tab's session storage and every action it takes is an audited API request. This
//! module only hands out the files, with headers that keep the browser from running anything
//! but them (a strict Content-Security-Policy) and from framing them.
//!
//! Why no framework and no build step: ARCHITECTURE.md ("The console").

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// A file of the console: its name under `/ui/`, content type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: [Asset; 3] = [
    Asset { name: "", content_type: "text/html; charset=utf-8", body: include_str!("../ui/index.html") },
    Asset { name: "app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("../ui/app.js") },
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", body: include_str!("../ui/style.css") },
];

/// Scripts and styles from this origin only, no inline code, API calls to this origin only,
/// snapshots downloaded through `blob:` URLs, and no framing (clickjacking).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}

pub async fn index() -> Response {
    serve("")
}

pub async fn file(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    serve(&name)
}

fn serve(name: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such file in the console").into_response();
    };
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The files change with the binary: a browser must not keep an old app.js after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_served_with_its_type_and_the_policy_and_others_are_not_found() {
        for asset in &ASSETS {
            let response = serve(asset.name);
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(response.headers()[header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(response.headers()[header::X_FRAME_OPTIONS], "DENY");
        }
        for missing in ["index.htm", "../Cargo.toml", "app.js.map", "favicon.ico"] {
            assert_eq!(serve(missing).status(), StatusCode::NOT_FOUND, "{missing}");
        }
    }

    #[test]
    fn the_console_loads_nothing_from_another_origin_and_runs_no_inline_code() {
        for asset in &ASSETS {
            for external in ["http://", "https://", "//cdn", "@import"] {
                assert!(!asset.body.contains(external), "{} refers to {external}", asset.name);
            }
        }
        let html = ASSETS[0].body;
        assert!(!html.contains("<script>") && !html.contains(" on") && !html.contains("style="), "inline code");
        assert!(html.contains(r#"<script src="app.js" defer></script>"#));
        let js = ASSETS[1].body;
        assert!(!js.contains("innerHTML") && !js.contains("eval("), "the app builds the DOM from text nodes only");
    }
}

//! A typed client for Citadel's HTTP API.
//!
//! It speaks Vault's wire format, so the same calls work against Vault; Citadel-only endpoints
//! (`sys/ha/*`, `sys/audit/*`) are marked as such. Errors carry the server's status and messages.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};

pub use reqwest::header::HeaderMap;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{status}: {}", messages.join("; "))]
    Api { status: StatusCode, messages: Vec<String>, body: Value },
    #[error("cannot reach {addr}: {source}")]
    Transport { addr: String, source: reqwest::Error },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("unexpected response: {0}")]
    Decode(String),
}

impl ClientError {
    /// The error for a non-2xx answer, with the server's messages: Citadel's and Vault's
    /// `errors` list, or etcd's gateway `message`.
    pub fn api(status: StatusCode, body: Value) -> ClientError {
        let mut messages: Vec<String> = body["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m.as_str().map(String::from)).collect())
            .unwrap_or_default();
        if let Some(message) = body["message"].as_str() {
            messages.push(message.to_string());
        }
        ClientError::Api { status, messages, body }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A reply: status, headers of interest, and the JSON body (or `Null` for 204).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub headers: HeaderMap,
}

/// How long a streamed request may stay open before the client ends it (then reconnects).
const STREAM_LIMIT: Duration = Duration::from_secs(7 * 86_400);
/// Longest line accepted from a stream.
const MAX_STREAM_LINE: usize = 1 << 20;

/// Lines of a newline-delimited JSON answer, one JSON value each.
pub struct LineStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    addr: String,
}

impl LineStream {
    /// The next line; `Ok(None)` once the server has ended the stream.
    pub async fn next(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .map_err(|e| ClientError::Decode(format!("a stream line is not JSON: {e}")));
            }
            if self.buffer.len() > MAX_STREAM_LINE {
                return Err(ClientError::Decode(format!("a stream line exceeds {MAX_STREAM_LINE} bytes")));
            }
            let chunk = self
                .response
                .chunk()
                .await
                .map_err(|source| ClientError::Transport { addr: self.addr.clone(), source })?;
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => return Ok(None),
            }
        }
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    addr: String,
    token: Option<String>,
    /// Replaces the 30-second default for requests that wait on long work (a resync).
    timeout: Option<Duration>,
}

fn tls_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("bad CA certificate: {e}")))?;
        roots.add(cert).map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("the CA file holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Client {
    /// A client for `addr` (e.g. `https://127.0.0.1:8200`) trusting the CA in `ca_pem`.
    pub fn new(addr: &str, ca_pem: &[u8]) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(ca_pem)?)
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Client { http, addr: addr.trim_end_matches('/').to_string(), token: None, timeout: None })
    }

    pub fn from_ca_file(addr: &str, ca: &Path) -> Result<Client, ClientError> {
        let pem = std::fs::read(ca).map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", ca.display())))?;
        Client::new(addr, &pem)
    }

    /// A client whose requests may take up to `timeout` (instead of 30 seconds).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    pub fn set_token(&mut self, token: impl Into<String>) {
        self.token = Some(token.into());
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends any request; non-2xx answers become `ClientError::Api`.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply, ClientError> {
        let reply = self.raw(method, path, body, &[]).await?;
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(ClientError::api(reply.status, reply.body))
        }
    }

    /// Sends a request and returns whatever came back, whatever the status.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        self.raw_at(method, &format!("/v1/{}", path.trim_start_matches('/')), body, headers).await
    }

    /// Like `raw`, for any path on the server (not only Vault's `/v1/`): `citadel bench` drives
    /// etcd's HTTP gateway with the same client as Citadel.
    pub async fn raw_at(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut builder = self.http.request(method, format!("{}{path}", self.addr));
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(token) = &self.token {
            builder = builder.header("X-Vault-Token", token);
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let response =
            builder.send().await.map_err(|source| ClientError::Transport { addr: self.addr.clone(), source })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes =
            response.bytes().await.map_err(|source| ClientError::Transport { addr: self.addr.clone(), source })?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply { status, body, headers })
    }

    /// Sends `body` as raw bytes and returns the raw answer (snapshots are binary files).
    pub async fn bytes(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, ClientError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut builder = self.http.request(method, format!("{}/v1/{}", self.addr, path.trim_start_matches('/')));
        if let Some(token) = &self.token {
            builder = builder.header("X-Vault-Token", token);
        }
        if let Some(body) = body {
            builder = builder.header("Content-Type", "application/octet-stream").body(body);
        }
        let transport = |source| ClientError::Transport { addr: self.addr.clone(), source };
        let response = builder.timeout(Duration::from_secs(600)).send().await.map_err(transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(transport)?.to_vec();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(ClientError::api(status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// Opens a streamed endpoint answering newline-delimited JSON (`sys/events`, Citadel only).
    /// A non-2xx answer is an error carrying the server's status and messages. The stream may
    /// stay open for days; a caller notices a dead one by the server's heartbeats stopping.
    pub async fn stream(&self, path: &str) -> Result<LineStream, ClientError> {
        let mut builder = self.http.get(format!("{}/v1/{}", self.addr, path.trim_start_matches('/')));
        if let Some(token) = &self.token {
            builder = builder.header("X-Vault-Token", token);
        }
        let transport = |source| ClientError::Transport { addr: self.addr.clone(), source };
        let response = builder.timeout(STREAM_LIMIT).send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(ClientError::api(status, response.json().await.unwrap_or(Value::Null)));
        }
        Ok(LineStream { response, buffer: Vec::new(), addr: self.addr.clone() })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.request("GET", path, None).await?.body)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        Ok(self.request("POST", path, Some(body)).await?.body)
    }

    pub async fn list(&self, path: &str) -> Result<Vec<String>, ClientError> {
        let body = self.request("LIST", path, None).await?.body;
        Ok(body["data"]["keys"]
            .as_array()
            .map(|k| k.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default())
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.request("DELETE", path, None).await.map(|_| ())
    }

    // ---- lifecycle ----

    pub async fn health(&self) -> Result<Reply, ClientError> {
        self.raw("GET", "sys/health", None, &[]).await
    }

    pub async fn seal_status(&self) -> Result<Value, ClientError> {
        self.get("sys/seal-status").await
    }

    /// Initializes the vault; returns (unseal key shares in hex, root token).
    pub async fn init(&self, shares: usize, threshold: usize) -> Result<(Vec<String>, String), ClientError> {
        let body = self.post("sys/init", &json!({ "secret_shares": shares, "secret_threshold": threshold })).await?;
        let keys = body["keys"].as_array().map(|k| k.iter().filter_map(|s| s.as_str().map(String::from)).collect());
        let root = body["root_token"].as_str().map(String::from);
        match (keys, root) {
            (Some(keys), Some(root)) => Ok((keys, root)),
            _ => Err(ClientError::Decode("init response lacks keys or root_token".into())),
        }
    }

    pub async fn unseal(&self, key: &str) -> Result<Value, ClientError> {
        self.post("sys/unseal", &json!({ "key": key })).await
    }

    // ---- auth ----

    /// Logs in with userpass; returns the client token (and adopts it).
    pub async fn login_userpass(&mut self, username: &str, password: &str) -> Result<String, ClientError> {
        self.login_userpass_at("userpass", username, password).await
    }

    /// Logs in with the userpass method mounted at `auth/<mount>/`.
    pub async fn login_userpass_at(
        &mut self,
        mount: &str,
        username: &str,
        password: &str,
    ) -> Result<String, ClientError> {
        let body = self.post(&format!("auth/{mount}/login/{username}"), &json!({ "password": password })).await?;
        let token = body["auth"]["client_token"]
            .as_str()
            .ok_or_else(|| ClientError::Decode("login response lacks auth.client_token".into()))?
            .to_string();
        self.token = Some(token.clone());
        Ok(token)
    }

    // ---- KV v2 ----

    /// Writes a secret; returns the new version.
    pub async fn kv_put(&self, mount: &str, path: &str, data: &Value, cas: Option<u64>) -> Result<u64, ClientError> {
        let mut body = json!({ "data": data });
        if let Some(cas) = cas {
            body["options"] = json!({ "cas": cas });
        }
        let reply = self.post(&format!("{mount}/data/{path}"), &body).await?;
        reply["data"]["version"].as_u64().ok_or_else(|| ClientError::Decode("write response lacks data.version".into()))
    }

    /// Reads the latest (or a given) version: `data.data` of Vault's answer.
    pub async fn kv_get(&self, mount: &str, path: &str, version: Option<u64>) -> Result<Value, ClientError> {
        let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
        let reply = self.get(&format!("{mount}/data/{path}{query}")).await?;
        Ok(reply["data"]["data"].clone())
    }
}

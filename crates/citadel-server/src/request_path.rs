//! The request path as Vault routes it: percent-decoded (Go's `net/http` decodes the path before
//! Vault sees it), then checked, so routing, the ACL and storage all see one spelling of a path
//! and no encoding can reach a different path than the one the ACL checked (§8.2).

/// The API path of a request, from the raw URI path (`/v1/secret/data/a%2Fb`): the part after
/// `/v1/`, percent-decoded, without leading or trailing slashes (`secret/data/a/b`).
///
/// Refused, with the reason: a `%` not followed by two hex digits, bytes that are not UTF-8 once
/// decoded, control characters, and, checked on the decoded path, `.` or `..` segments and empty
/// segments (`//`).
pub fn api_path(raw: &str) -> Result<String, String> {
    let encoded = raw.strip_prefix("/v1/").ok_or_else(|| "the path must start with /v1/".to_string())?;
    let decoded = String::from_utf8(percent_decode(encoded)?)
        .map_err(|_| "invalid path: it is not UTF-8 once percent-decoded".to_string())?;
    if decoded.chars().any(char::is_control) {
        return Err("invalid path: it contains a control character".into());
    }
    let path = decoded.trim_matches('/');
    if path.split('/').any(|segment| segment == "." || segment == "..") {
        return Err("invalid path: '.' and '..' segments are not allowed".into());
    }
    if path.contains("//") {
        return Err("invalid path: empty segments ('//') are not allowed".into());
    }
    Ok(path.to_string())
}

/// The query parameters of `uri`, percent-decoded (the last value wins for a repeated name).
pub fn query(uri: &axum::http::Uri) -> Result<std::collections::HashMap<String, String>, String> {
    axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
        .map(|axum::extract::Query(q)| q)
        .map_err(|e| format!("invalid query string: {e}"))
}

/// Percent-encodes an API path for a URL (a redirect's `Location`): every byte but unreserved
/// characters and `/`, so that [`api_path`] of `/v1/` + the result gives the path back.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes every `%XX`; a `%` without two hex digits after it is an error (Go refuses it too).
fn percent_decode(encoded: &str) -> Result<Vec<u8>, String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid path: bad percent-encoding at byte {i}"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{api_path, encode_path};

    #[test]
    fn paths_are_percent_decoded_before_anything_else_sees_them() {
        assert_eq!(api_path("/v1/secret/data/a%2Fb").unwrap(), "secret/data/a/b");
        assert_eq!(api_path("/v1/secret/data/%61pp/db").unwrap(), "secret/data/app/db");
        assert_eq!(api_path("/v1/secret/data/caf%C3%A9").unwrap(), "secret/data/café");
        assert_eq!(api_path("/v1/secret/data/x/").unwrap(), "secret/data/x");
        assert_eq!(api_path("/v1/secret/data/100%25").unwrap(), "secret/data/100%", "decoded once, as Go does");
        assert_eq!(api_path("/v1/secret/data/a+b").unwrap(), "secret/data/a+b", "'+' is not a space in a path");
    }

    #[test]
    fn encoded_paths_decode_back_to_themselves() {
        for path in ["secret/data/plain", "secret/data/a b?c#d%e", "secret/data/café/\u{1F511}", "a/+/*"] {
            assert_eq!(api_path(&format!("/v1/{}", encode_path(path))).unwrap(), path);
        }
        assert_eq!(encode_path("a b/c"), "a%20b/c");
    }

    #[test]
    fn dot_segments_and_empty_segments_are_refused_after_decoding() {
        for raw in [
            "/v1/secret/data/../x",
            "/v1/secret/data/%2e%2e/x",
            "/v1/secret/data/%2E%2E/x",
            "/v1/secret/data/.%2e",
            "/v1/secret/data/%2e/x",
            "/v1/secret/data//x",
            "/v1/secret/data/%2F/x",
            "/v1/secret/data/a%2F%2Fb",
            "/v1/secret%2fdata%2f..%2fx",
        ] {
            assert!(api_path(raw).unwrap_err().starts_with("invalid path"), "{raw}");
        }
    }

    #[test]
    fn bad_escapes_invalid_utf8_and_control_characters_are_refused() {
        for raw in ["/v1/secret/data/%", "/v1/secret/data/%4", "/v1/secret/data/%zz", "/v1/secret/data/%+1"] {
            assert!(api_path(raw).unwrap_err().contains("percent-encoding"), "{raw}");
        }
        assert!(api_path("/v1/secret/data/%ff").unwrap_err().contains("UTF-8"));
        assert!(api_path("/v1/secret/data/%C3").unwrap_err().contains("UTF-8"));
        assert!(api_path("/v1/secret/data/a%00b").unwrap_err().contains("control"));
        assert!(api_path("/v1/secret/data/a%0Ab").unwrap_err().contains("control"));
        assert!(api_path("/secret/data/x").is_err());
    }
}

//! Request paths and query strings as the API sees them, split out of the HTTP entry point so
//! that they are pure functions, tested on arbitrary input (`docs/TESTING.md`, fuzzing).

use std::collections::HashMap;

use axum::extract::Query;
use axum::http::Uri;

/// Why a request path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// A `.` or `..` segment, or an empty one (`//`): Vault refuses them, and they would let one
    /// path name another for the ACL.
    DotOrEmptySegment,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::DotOrEmptySegment => f.write_str("invalid path: it has a '.', '..' or empty segment"),
        }
    }
}

impl std::error::Error for PathError {}

/// The API path of a request URI path: after `/v1/`, without leading or trailing slashes.
pub fn normalize(uri_path: &str) -> Result<String, PathError> {
    let path = uri_path.strip_prefix("/v1/").unwrap_or_default().trim_matches('/');
    if path.split('/').any(|seg| seg == ".." || seg == ".") || path.contains("//") {
        return Err(PathError::DotOrEmptySegment);
    }
    Ok(path.to_string())
}

/// The query parameters of `uri` (the last value wins for a repeated name).
pub fn query(uri: &Uri) -> Result<HashMap<String, String>, String> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| format!("invalid query string: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lose_their_prefix_and_slashes_and_dot_segments_are_refused() {
        assert_eq!(normalize("/v1/secret/data/a/").unwrap(), "secret/data/a");
        assert_eq!(normalize("/v1/").unwrap(), "");
        assert_eq!(normalize("/v1/secret/../sys/seal"), Err(PathError::DotOrEmptySegment));
        assert_eq!(normalize("/v1/secret//a"), Err(PathError::DotOrEmptySegment));
        assert_eq!(normalize("/v1/./a"), Err(PathError::DotOrEmptySegment));
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let uri: Uri = "/v1/x?list=true&a=%20b".parse().unwrap();
        let q = query(&uri).unwrap();
        assert_eq!(q["list"], "true");
        assert_eq!(q["a"], " b");
    }
}

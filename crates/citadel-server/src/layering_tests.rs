//! The rule of layers inside this crate (docs/ARCHITECTURE.md, "Layers inside citadel-server"):
//! the HTTP layer may use the node layer; the node layer never uses the HTTP layer. Checked on
//! the source text, so a new node module is covered the day it is added.

use std::path::{Path, PathBuf};

/// The HTTP layer: these modules, and everything under `api/`.
const HTTP_MODULES: &[&str] = &["api", "server", "limits", "request_path", "ui"];
/// Neither layer: the crate root declares every module, and test modules may use anything.
const EXEMPT: &[&str] = &["lib.rs", "fuzz_tests.rs", "layering_tests.rs"];

/// The HTTP modules that `source` names through `crate::` or `super::`, as written
/// (`crate::api`), including inside brace groups (`use crate::{node::Node, api::ApiError}`).
fn http_mentions(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut rest = source;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let names = match rest.strip_prefix('{') {
                Some(group) => group_heads(group),
                None => vec![first_segment(rest)],
            };
            found.extend(names.into_iter().filter(|n| HTTP_MODULES.contains(n)).map(|n| format!("{prefix}{n}")));
        }
    }
    found
}

/// The first path segment of each item of a `{...}` group (`group` starts after the `{`).
fn group_heads(group: &str) -> Vec<&str> {
    let mut heads = vec![first_segment(group)];
    let mut depth = 0usize;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => heads.push(first_segment(&group[i + 1..])),
            _ => {}
        }
    }
    heads
}

fn first_segment(path: &str) -> &str {
    let path = path.trim_start();
    let end = path.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(path.len());
    &path[..end]
}

/// Every `.rs` file under `dir`, as paths relative to `root`.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path.strip_prefix(root).expect("under the root").to_path_buf());
        }
    }
}

fn is_node_layer(file: &Path) -> bool {
    let Some(top) = file.components().next().and_then(|c| c.as_os_str().to_str()) else { return false };
    let module = top.strip_suffix(".rs").unwrap_or(top);
    !HTTP_MODULES.contains(&module) && !EXEMPT.contains(&top)
}

#[test]
fn the_node_layer_never_imports_the_http_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    let node: Vec<&PathBuf> = files.iter().filter(|f| is_node_layer(f)).collect();
    for expected in ["node.rs", "cluster.rs", "forwarded.rs", "membership.rs"] {
        assert!(node.iter().any(|f| f.as_os_str() == expected), "{expected} is not among the node layer's files");
    }
    let violations: Vec<String> = node
        .iter()
        .filter_map(|file| {
            let source = std::fs::read_to_string(src.join(file)).expect("a readable source file");
            let mentions = http_mentions(&source);
            (!mentions.is_empty()).then(|| format!("src/{} uses {}", file.display(), mentions.join(", ")))
        })
        .collect();
    assert!(
        violations.is_empty(),
        "the node layer must not use the HTTP layer (move what it needs down into the node layer):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_layering_check_catches_every_form_of_use() {
    assert_eq!(http_mentions("use crate::api::ApiError;"), ["crate::api"]);
    assert_eq!(http_mentions("crate::server::ship_audit_batch(app)"), ["crate::server"]);
    assert_eq!(http_mentions("use crate::{node::Node, limits::cap_for_audit};"), ["crate::limits"]);
    assert_eq!(http_mentions("use crate::{node::{Node, REQUEST}, api::{self, ApiError}};"), ["crate::api"]);
    assert_eq!(http_mentions("use crate::{\n    api,\n    node::Node,\n};"), ["crate::api"]);
    assert_eq!(http_mentions("use super::request_path::api_path;"), ["super::request_path"]);
    assert!(http_mentions("use crate::node::Node; use crate::apis; use super::*; // the api").is_empty());
}

#[test]
fn http_files_and_the_root_are_not_node_layer() {
    for file in ["server.rs", "limits.rs", "request_path.rs", "api/mod.rs", "api/kv.rs", "lib.rs", "fuzz_tests.rs"] {
        assert!(!is_node_layer(Path::new(file)), "{file}");
    }
    for file in ["node.rs", "node_error.rs", "audit_shipping.rs", "node/raft.rs"] {
        assert!(is_node_layer(Path::new(file)), "{file}");
    }
}

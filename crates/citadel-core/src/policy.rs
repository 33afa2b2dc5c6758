//! ACL policies in Vault's language, and their evaluation.
//!
//! A policy is a list of `path "PATTERN" { capabilities = [...] }` rules, written in HCL or the
//! equivalent JSON. Patterns are exact, end in `*` (prefix glob), or contain `+` (exactly one
//! segment). When several patterns match a request path, the most specific wins, by Vault's
//! precedence rules; rules for the same pattern across a token's policies are merged, and `deny`
//! beats everything.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A capability bit set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps(pub u16);

impl Caps {
    pub const CREATE: Caps = Caps(1);
    pub const READ: Caps = Caps(2);
    pub const UPDATE: Caps = Caps(4);
    pub const PATCH: Caps = Caps(8);
    pub const DELETE: Caps = Caps(16);
    pub const LIST: Caps = Caps(32);
    pub const SUDO: Caps = Caps(64);
    pub const DENY: Caps = Caps(128);
    /// Every grant (what the root policy holds).
    pub const ALL: Caps = Caps(127);
    const NAMES: [(&'static str, Caps); 8] = [
        ("create", Caps::CREATE),
        ("read", Caps::READ),
        ("update", Caps::UPDATE),
        ("patch", Caps::PATCH),
        ("delete", Caps::DELETE),
        ("list", Caps::LIST),
        ("sudo", Caps::SUDO),
        ("deny", Caps::DENY),
    ];

    pub fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }

    pub fn parse(name: &str) -> Option<Caps> {
        Caps::NAMES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
    }

    pub fn names(self) -> Vec<&'static str> {
        if self.contains(Caps::DENY) {
            return vec!["deny"];
        }
        Caps::NAMES.iter().filter(|(_, c)| self.contains(*c)).map(|(n, _)| *n).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub pattern: String,
    pub caps: Caps,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    /// The text as the operator wrote it, returned verbatim on read.
    pub raw: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy name {0:?} is invalid: use letters, digits, '-', '_' and '.' (at most 128)")]
    BadName(String),
    #[error("policy {0:?} is built in and cannot be changed or deleted")]
    BuiltIn(String),
    #[error("policy syntax error at line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("unknown capability {0:?} (expected create, read, update, patch, delete, list, sudo or deny)")]
    UnknownCapability(String),
    #[error("path rule {0:?} has no capabilities")]
    NoCapabilities(String),
}

pub const ROOT: &str = "root";
pub const DEFAULT: &str = "default";

/// Vault's `default` policy, trimmed to the endpoints Citadel serves: a token may look itself up,
/// renew and revoke itself.
pub const DEFAULT_POLICY_TEXT: &str = r#"# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}
"#;

pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::BadName(name.to_string()))
    }
}

/// Parses HCL or JSON policy text.
pub fn parse(name: &str, text: &str) -> Result<Policy, PolicyError> {
    validate_name(name)?;
    let rules = if text.trim_start().starts_with('{') { parse_json(text)? } else { parse_hcl(text)? };
    Ok(Policy { name: name.to_string(), raw: text.to_string(), rules })
}

pub fn default_policy() -> Policy {
    parse(DEFAULT, DEFAULT_POLICY_TEXT).expect("built-in default policy parses")
}

fn caps_from_names<'a>(pattern: &str, names: impl IntoIterator<Item = &'a str>) -> Result<Caps, PolicyError> {
    let mut caps = Caps::default();
    let mut any = false;
    for name in names {
        any = true;
        caps = caps.union(Caps::parse(name).ok_or_else(|| PolicyError::UnknownCapability(name.to_string()))?);
    }
    if !any {
        return Err(PolicyError::NoCapabilities(pattern.to_string()));
    }
    Ok(caps)
}

fn parse_json(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let syntax = |message: String| PolicyError::Syntax { line: 1, message };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| PolicyError::Syntax { line: e.line(), message: e.to_string() })?;
    let paths = value
        .get("path")
        .and_then(|p| p.as_object())
        .ok_or_else(|| syntax("expected an object with a \"path\" object".into()))?;
    let mut rules = Vec::new();
    for (pattern, body) in paths {
        let caps = body
            .get("capabilities")
            .and_then(|c| c.as_array())
            .ok_or_else(|| syntax(format!("path {pattern:?} needs a \"capabilities\" list")))?;
        let names: Option<Vec<&str>> = caps.iter().map(|c| c.as_str()).collect();
        let names = names.ok_or_else(|| syntax(format!("capabilities of {pattern:?} must be strings")))?;
        rules.push(Rule { pattern: pattern.clone(), caps: caps_from_names(pattern, names)? });
    }
    Ok(rules)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(char),
}

fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, PolicyError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '/' => {
                chars.next();
                match chars.next() {
                    Some('/') => {
                        while chars.peek().is_some_and(|&c| c != '\n') {
                            chars.next();
                        }
                    }
                    Some('*') => {
                        let mut prev = ' ';
                        loop {
                            match chars.next() {
                                Some('/') if prev == '*' => break,
                                Some(ch) => {
                                    if ch == '\n' {
                                        line += 1;
                                    }
                                    prev = ch;
                                }
                                None => {
                                    return Err(PolicyError::Syntax { line, message: "unterminated comment".into() })
                                }
                            }
                        }
                    }
                    _ => return Err(PolicyError::Syntax { line, message: "unexpected '/'".into() }),
                }
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => s.push('\n'),
                            Some(other) => s.push(other),
                            None => return Err(PolicyError::Syntax { line, message: "unterminated string".into() }),
                        },
                        Some('\n') | None => {
                            return Err(PolicyError::Syntax { line, message: "unterminated string".into() })
                        }
                        Some(ch) => s.push(ch),
                    }
                }
                out.push((Token::Str(s), line));
            }
            '{' | '}' | '[' | ']' | '=' | ',' | ':' => {
                out.push((Token::Punct(c), line));
                chars.next();
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' => {
                let mut s = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' || ch == '.' {
                        s.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push((Token::Ident(s), line));
            }
            other => return Err(PolicyError::Syntax { line, message: format!("unexpected character {other:?}") }),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    pos: usize,
}

impl Parser {
    fn line(&self) -> usize {
        self.tokens.get(self.pos).or(self.tokens.last()).map(|t| t.1).unwrap_or(1)
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, PolicyError> {
        Err(PolicyError::Syntax { line: self.line(), message: message.into() })
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).map(|t| t.0.clone());
        self.pos += 1;
        token
    }

    fn expect(&mut self, c: char) -> Result<(), PolicyError> {
        match self.next() {
            Some(Token::Punct(p)) if p == c => Ok(()),
            other => self.err(format!("expected '{c}', found {other:?}")),
        }
    }

    /// A value we do not interpret (e.g. `allowed_parameters`), skipped structurally.
    fn skip_value(&mut self) -> Result<(), PolicyError> {
        match self.next() {
            Some(Token::Str(_)) | Some(Token::Ident(_)) => Ok(()),
            Some(Token::Punct('[')) => self.skip_until(']'),
            Some(Token::Punct('{')) => self.skip_until('}'),
            other => self.err(format!("expected a value, found {other:?}")),
        }
    }

    fn skip_until(&mut self, close: char) -> Result<(), PolicyError> {
        let open = if close == ']' { '[' } else { '{' };
        let mut depth = 1;
        while depth > 0 {
            match self.next() {
                Some(Token::Punct(c)) if c == open => depth += 1,
                Some(Token::Punct(c)) if c == close => depth -= 1,
                Some(_) => {}
                None => return self.err(format!("missing '{close}'")),
            }
        }
        Ok(())
    }

    fn string_list(&mut self) -> Result<Vec<String>, PolicyError> {
        self.expect('[')?;
        let mut items = Vec::new();
        loop {
            match self.next() {
                Some(Token::Punct(']')) => return Ok(items),
                Some(Token::Str(s)) => {
                    items.push(s);
                    match self.next() {
                        Some(Token::Punct(',')) => {}
                        Some(Token::Punct(']')) => return Ok(items),
                        other => return self.err(format!("expected ',' or ']', found {other:?}")),
                    }
                }
                other => return self.err(format!("expected a quoted capability, found {other:?}")),
            }
        }
    }
}

fn parse_hcl(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let mut p = Parser { tokens: tokenize(text)?, pos: 0 };
    let mut rules = Vec::new();
    while p.pos < p.tokens.len() {
        match p.next() {
            Some(Token::Ident(kw)) if kw == "path" => {}
            other => return p.err(format!("expected 'path', found {other:?}")),
        }
        let pattern = match p.next() {
            Some(Token::Str(s)) => s,
            other => return p.err(format!("expected a quoted path after 'path', found {other:?}")),
        };
        p.expect('{')?;
        let mut caps = None;
        loop {
            match p.next() {
                Some(Token::Punct('}')) => break,
                Some(Token::Ident(key)) => {
                    match p.next() {
                        Some(Token::Punct('=')) | Some(Token::Punct(':')) => {}
                        other => return p.err(format!("expected '=' after {key:?}, found {other:?}")),
                    }
                    if key == "capabilities" {
                        let names = p.string_list()?;
                        caps = Some(caps_from_names(&pattern, names.iter().map(String::as_str))?);
                    } else if key == "policy" {
                        // Legacy shorthand: policy = "read" | "write" | "deny" | "sudo".
                        let level = match p.next() {
                            Some(Token::Str(s)) => s,
                            other => return p.err(format!("expected a quoted policy level, found {other:?}")),
                        };
                        caps = Some(legacy_level(&pattern, &level)?);
                    } else {
                        p.skip_value()?;
                    }
                    if let Some(Token::Punct(',')) = p.tokens.get(p.pos).map(|t| &t.0) {
                        p.pos += 1;
                    }
                }
                other => return p.err(format!("expected a key or '}}' in path {pattern:?}, found {other:?}")),
            }
        }
        let caps = caps.ok_or_else(|| PolicyError::NoCapabilities(pattern.clone()))?;
        rules.push(Rule { pattern, caps });
    }
    Ok(rules)
}

fn legacy_level(pattern: &str, level: &str) -> Result<Caps, PolicyError> {
    let names: &[&str] = match level {
        "deny" => &["deny"],
        "read" => &["read", "list"],
        "write" => &["create", "read", "update", "patch", "delete", "list"],
        "sudo" => &["create", "read", "update", "patch", "delete", "list", "sudo"],
        other => return Err(PolicyError::UnknownCapability(other.to_string())),
    };
    caps_from_names(pattern, names.iter().copied())
}

/// Whether `pattern` matches the request `path` (no leading slash).
pub fn matches(pattern: &str, path: &str) -> bool {
    let (pat, glob) = match pattern.strip_suffix('*') {
        Some(p) => (p, true),
        None => (pattern, false),
    };
    if !pat.contains('+') {
        return if glob { path.starts_with(pat) } else { path == pat };
    }
    let pat_segments: Vec<&str> = pat.split('/').collect();
    let path_segments: Vec<&str> = path.split('/').collect();
    if path_segments.len() < pat_segments.len() || (!glob && path_segments.len() != pat_segments.len()) {
        return false;
    }
    let last = pat_segments.len() - 1;
    pat_segments.iter().zip(&path_segments).enumerate().all(|(i, (p, x))| {
        if *p == "+" {
            !x.is_empty()
        } else if i == last && glob {
            x.starts_with(p)
        } else {
            p == x
        }
    })
}

/// Vault's precedence: returns `Ordering::Greater` when `a` is more specific than `b`.
fn specificity(a: &str, b: &str) -> Ordering {
    let first_wildcard = |p: &str| p.find(['+', '*']).unwrap_or(usize::MAX);
    let plus_count = |p: &str| p.split('/').filter(|s| *s == "+").count();
    first_wildcard(a)
        .cmp(&first_wildcard(b))
        .then_with(|| b.ends_with('*').cmp(&a.ends_with('*')))
        .then_with(|| plus_count(b).cmp(&plus_count(a)))
        .then_with(|| a.len().cmp(&b.len()))
        .then_with(|| a.cmp(b))
}

/// The capabilities a set of policies grants on `path`.
pub fn capabilities<'a>(policies: impl IntoIterator<Item = &'a Policy>, path: &str) -> Caps {
    let mut merged: BTreeMap<&str, Caps> = BTreeMap::new();
    for policy in policies {
        for rule in &policy.rules {
            if matches(&rule.pattern, path) {
                let entry = merged.entry(rule.pattern.as_str()).or_default();
                *entry = entry.union(rule.caps);
            }
        }
    }
    let best = merged.into_iter().max_by(|a, b| specificity(a.0, b.0));
    match best {
        Some((_, caps)) if !caps.contains(Caps::DENY) => caps,
        _ => Caps::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        parse("p", text).unwrap()
    }

    #[test]
    fn hcl_and_json_forms_parse_to_the_same_rules() {
        let hcl = policy(
            r#"
            # comment
            path "secret/data/prod/*" {
                capabilities = ["read", "list"]
            }
            path "secret/data/dev/+" { capabilities = ["create", "update"] }
            "#,
        );
        let json = policy(
            r#"{"path": {"secret/data/prod/*": {"capabilities": ["read","list"]},
                         "secret/data/dev/+": {"capabilities": ["create","update"]}}}"#,
        );
        let mut a = hcl.rules.clone();
        let mut b = json.rules.clone();
        a.sort_by(|x, y| x.pattern.cmp(&y.pattern));
        b.sort_by(|x, y| x.pattern.cmp(&y.pattern));
        assert_eq!(a, b);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse("p", "path \"a\" {\n capabilities = [\"read\"\n").unwrap_err();
        assert!(matches!(err, PolicyError::Syntax { line: 2, .. }), "{err:?}");
        assert_eq!(
            parse("p", "path \"a\" { capabilities = [\"fly\"] }").unwrap_err(),
            PolicyError::UnknownCapability("fly".into())
        );
        assert!(matches!(parse("bad name", "").unwrap_err(), PolicyError::BadName(_)));
    }

    #[test]
    fn glob_and_plus_patterns_match_as_vault_does() {
        assert!(matches("secret/data/prod/*", "secret/data/prod/db/pass"));
        assert!(matches("secret/data/prod*", "secret/data/production"));
        assert!(!matches("secret/data/prod/*", "secret/data/dev/x"));
        assert!(matches("secret/data/+/db", "secret/data/team1/db"));
        assert!(!matches("secret/data/+/db", "secret/data/a/b/db"));
        assert!(matches("secret/+/+/*", "secret/data/x/y/z"));
        assert!(matches("secret/data/exact", "secret/data/exact"));
        assert!(!matches("secret/data/exact", "secret/data/exact/more"));
    }

    #[test]
    fn most_specific_pattern_wins_over_broader_glob() {
        let p = policy(
            r#"
            path "secret/*" { capabilities = ["read", "list"] }
            path "secret/data/admin" { capabilities = ["create", "update", "read"] }
            path "secret/data/locked" { capabilities = ["deny"] }
            "#,
        );
        assert_eq!(capabilities([&p], "secret/data/x"), Caps::READ.union(Caps::LIST));
        assert!(capabilities([&p], "secret/data/admin").contains(Caps::UPDATE));
        assert_eq!(capabilities([&p], "secret/data/locked"), Caps::default());
        assert_eq!(capabilities([&p], "other/x"), Caps::default());
    }

    #[test]
    fn deny_in_any_policy_overrides_grants_for_the_same_pattern() {
        let allow = policy(r#"path "secret/data/x" { capabilities = ["read"] }"#);
        let deny = parse("d", r#"path "secret/data/x" { capabilities = ["deny"] }"#).unwrap();
        assert_eq!(capabilities([&allow, &deny], "secret/data/x"), Caps::default());
        assert_eq!(capabilities([&allow], "secret/data/x"), Caps::READ);
    }

    #[test]
    fn precedence_prefers_later_wildcards_then_non_glob_then_fewer_plus() {
        assert_eq!(specificity("secret/data/a*", "secret/*"), Ordering::Greater);
        assert_eq!(specificity("secret/+/a", "secret/+/a*"), Ordering::Greater);
        assert_eq!(specificity("a/+/b/c", "a/+/+/c"), Ordering::Greater);
    }

    #[test]
    fn default_policy_lets_a_token_look_itself_up_only() {
        let d = default_policy();
        assert!(capabilities([&d], "auth/token/lookup-self").contains(Caps::READ));
        assert_eq!(capabilities([&d], "secret/data/x"), Caps::default());
    }
}

//! ACL policies in Vault's language, and their evaluation.
//!
//! A policy is a list of `path "PATTERN" { capabilities = [...] }` rules, written in HCL or the
//! equivalent JSON. Patterns are exact, end in `*` (prefix glob), or contain `+` (exactly one
//! segment). When several patterns match a request path, the most specific wins, by Vault's
//! precedence rules; rules for the same pattern across a token's policies are merged, and `deny`
//! beats everything.
//!
//! A rule may also constrain the request's parameters (`allowed_parameters`, `denied_parameters`,
//! `required_parameters`); [`ParamRules::check`] enforces them as Vault 1.21 does.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

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

    pub const fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn intersects(self, other: Caps) -> bool {
        self.0 & other.0 != 0
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
    /// Absent from policies stored before parameter constraints were enforced.
    #[serde(default, skip_serializing_if = "ParamRules::is_empty")]
    pub params: ParamRules,
}

/// One value a parameter constraint names: a string (which may glob with a leading or trailing
/// `*`), a number or a boolean.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Number(Number),
    String(String),
}

/// Vault's parameter constraints on one path (its "fine-grained control"). Keys are lower-cased,
/// as Vault stores them. An empty value list means "any value" when allowed and "the parameter
/// at all" when denied; the key `*` stands for every parameter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamRules {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allowed: BTreeMap<String, Vec<ParamValue>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub denied: BTreeMap<String, Vec<ParamValue>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
}

/// Why a request's parameters were refused by a policy's constraints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamRefusal {
    #[error("parameter {0:?} is required on this path")]
    Missing(String),
    #[error("parameter {0:?} (or this value of it) is denied on this path")]
    Denied(String),
    #[error("parameter {0:?} (or this value of it) is not allowed on this path")]
    NotAllowed(String),
}

impl ParamRules {
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty() && self.denied.is_empty() && self.required.is_empty()
    }

    /// Merges the constraints another policy puts on the same pattern, as Vault merges them: value
    /// lists are joined, and an empty list (any value / the whole parameter) absorbs the others.
    fn merge(&mut self, other: &ParamRules) {
        merge_values(&mut self.allowed, &other.allowed);
        merge_values(&mut self.denied, &other.denied);
        for name in &other.required {
            if !self.required.contains(name) {
                self.required.push(name.clone());
            }
        }
    }

    /// Checks a request's top-level parameters, in Vault's order: required ones first, then (if
    /// there are any parameters) denied ones, then allowed ones.
    pub fn check(&self, data: &Map<String, Value>) -> Result<(), ParamRefusal> {
        if let Some(missing) = self.required.iter().find(|name| !data.contains_key(name.as_str())) {
            return Err(ParamRefusal::Missing(missing.clone()));
        }
        if data.is_empty() {
            return Ok(());
        }
        if self.denied.contains_key("*") {
            return Err(ParamRefusal::Denied(data.keys().next().cloned().unwrap_or_default()));
        }
        for (name, value) in data {
            if let Some(values) = self.denied.get(&name.to_lowercase()) {
                if denied_value(value, values) {
                    return Err(ParamRefusal::Denied(name.clone()));
                }
            }
        }
        if self.allowed.is_empty() {
            return Ok(());
        }
        let allowed_all = self.allowed.contains_key("*");
        for (name, value) in data {
            match self.allowed.get(&name.to_lowercase()) {
                None if allowed_all => {}
                Some(values) if allowed_value(value, values) => {}
                _ => return Err(ParamRefusal::NotAllowed(name.clone())),
            }
        }
        Ok(())
    }
}

fn merge_values(into: &mut BTreeMap<String, Vec<ParamValue>>, from: &BTreeMap<String, Vec<ParamValue>>) {
    for (name, values) in from {
        match into.get_mut(name) {
            Some(existing) if existing.is_empty() => {}
            Some(_) if values.is_empty() => {
                into.insert(name.clone(), Vec::new());
            }
            Some(existing) => existing.extend(values.iter().cloned()),
            None => {
                into.insert(name.clone(), values.clone());
            }
        }
    }
}

/// Vault's `GlobbedStringsMatch`: a leading and/or trailing `*` matches any suffix/prefix.
fn glob_matches(pattern: &str, value: &str) -> bool {
    if pattern.len() < 2 {
        return pattern == value;
    }
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(_), Some(_)) => value.contains(&pattern[1..pattern.len() - 1]),
        (Some(suffix), None) => value.ends_with(suffix),
        (None, Some(prefix)) => value.starts_with(prefix),
        (None, None) => pattern == value,
    }
}

fn value_in(value: &Value, list: &[ParamValue]) -> bool {
    list.iter().any(|item| match (item, value) {
        (ParamValue::String(p), Value::String(v)) => glob_matches(p, v),
        (ParamValue::Bool(p), Value::Bool(v)) => p == v,
        (ParamValue::Number(p), Value::Number(v)) => p == v,
        _ => false,
    })
}

/// The elements of a list-valued parameter: a JSON array, or a comma-separated string (Vault
/// 1.21 treats both as lists when checking constraints).
fn elements(value: &Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items.clone()),
        Value::String(s) if s.contains(',') => Some(s.split(',').map(|e| Value::String(e.trim().into())).collect()),
        _ => None,
    }
}

/// Allowed if the whole value matches, or if it is a list all of whose elements match.
fn allowed_value(value: &Value, list: &[ParamValue]) -> bool {
    list.is_empty()
        || value_in(value, list)
        || elements(value).is_some_and(|items| items.iter().all(|item| value_in(item, list)))
}

/// Denied if the whole value matches, or if it is a list any of whose elements match.
fn denied_value(value: &Value, list: &[ParamValue]) -> bool {
    list.is_empty()
        || value_in(value, list)
        || elements(value).is_some_and(|items| items.iter().any(|item| value_in(item, list)))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredPolicy")]
pub struct Policy {
    pub name: String,
    /// The text as the operator wrote it, returned verbatim on read.
    pub raw: String,
    pub rules: Vec<Rule>,
}

/// A policy as stored (in the log, snapshots and state), before [`Policy::from`] upgrades it.
#[derive(Deserialize)]
struct StoredPolicy {
    name: String,
    raw: String,
    rules: Vec<Rule>,
}

impl From<StoredPolicy> for Policy {
    /// Policies stored before parameter constraints were enforced kept their text but lost the
    /// constraints from their rules; they are parsed again from their text, so that what an
    /// operator wrote is enforced after an upgrade. One whose constraints the parser now refuses
    /// grants nothing (fail closed) until it is rewritten. A pure function of the stored data, so
    /// every replica reaches the same rules.
    fn from(stored: StoredPolicy) -> Policy {
        let StoredPolicy { name, raw, rules } = stored;
        let lost_constraints =
            raw.contains("_parameters") && rules.iter().all(|r| r.params.is_empty()) && name != DEFAULT;
        let rules = if lost_constraints { parse(&name, &raw).map(|p| p.rules).unwrap_or_default() } else { rules };
        Policy { name, raw, rules }
    }
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
    #[error("path {path:?}: {key} {message}")]
    BadParameters { path: String, key: String, message: String },
    #[error("path {path:?}: unsupported key {key:?} (expected capabilities, policy, allowed_parameters, denied_parameters, required_parameters or comment)")]
    UnknownKey { path: String, key: String },
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
        let caps = caps_from_names(pattern, names)?;
        let known = |key: &String| key == "capabilities" || key == "comment" || PARAM_KEYS.contains(&key.as_str());
        if let Some(key) = body.as_object().and_then(|keys| keys.keys().find(|key| !known(key))) {
            return Err(PolicyError::UnknownKey { path: pattern.clone(), key: key.clone() });
        }
        let mut params = ParamRules::default();
        for key in PARAM_KEYS {
            if let Some(value) = body.get(key) {
                set_param_rule(&mut params, pattern, key, value)?;
            }
        }
        rules.push(Rule { pattern: pattern.clone(), caps, params });
    }
    Ok(rules)
}

const PARAM_KEYS: [&str; 3] = ["allowed_parameters", "denied_parameters", "required_parameters"];

/// Sets one of a rule's parameter constraints from its JSON (or HCL, converted) value.
fn set_param_rule(params: &mut ParamRules, pattern: &str, key: &str, value: &Value) -> Result<(), PolicyError> {
    let bad = |message: &str| PolicyError::BadParameters {
        path: pattern.to_string(),
        key: key.to_string(),
        message: message.to_string(),
    };
    if key == "required_parameters" {
        let names = value.as_array().ok_or_else(|| bad("must be a list of parameter names"))?;
        for name in names {
            let name = name.as_str().ok_or_else(|| bad("must be a list of parameter names"))?.to_lowercase();
            if !params.required.contains(&name) {
                params.required.push(name);
            }
        }
        return Ok(());
    }
    let map = value.as_object().ok_or_else(|| bad("must map parameter names to lists of values"))?;
    let mut out = BTreeMap::new();
    for (name, values) in map {
        let values = values.as_array().ok_or_else(|| bad(&format!("value of {name:?} must be a list")))?;
        let values = values
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(ParamValue::String(s.clone())),
                Value::Number(n) => Ok(ParamValue::Number(n.clone())),
                Value::Bool(b) => Ok(ParamValue::Bool(*b)),
                _ => Err(bad(&format!("values of {name:?} must be strings, numbers or booleans"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if name == "*" && !values.is_empty() {
            return Err(bad("\"*\" takes only the empty list"));
        }
        out.insert(name.to_lowercase(), values);
    }
    if key == "allowed_parameters" {
        params.allowed = out;
    } else {
        params.denied = out;
    }
    Ok(())
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

/// How deeply HCL values may nest: parameter constraints need two levels; the bound keeps a
/// hostile policy from exhausting the stack.
const MAX_VALUE_DEPTH: usize = 8;

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

    /// A value we do not interpret (a `comment`), skipped structurally.
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

    /// An HCL value as JSON: a string, a bare number or boolean, a list, or a `{ key = value }` map
    /// (entries separated by newlines or commas).
    fn value(&mut self, depth: usize) -> Result<Value, PolicyError> {
        if depth > MAX_VALUE_DEPTH {
            return self.err(format!("values nest deeper than {MAX_VALUE_DEPTH} levels"));
        }
        match self.next() {
            Some(Token::Str(s)) => Ok(Value::String(s)),
            Some(Token::Ident(word)) => match word.as_str() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => match word.parse::<Number>() {
                    Ok(n) => Ok(Value::Number(n)),
                    Err(_) => self.err(format!("expected a value, found {word:?}")),
                },
            },
            Some(Token::Punct('[')) => {
                let mut items = Vec::new();
                loop {
                    if let Some(Token::Punct(']')) = self.tokens.get(self.pos).map(|t| &t.0) {
                        self.pos += 1;
                        return Ok(Value::Array(items));
                    }
                    items.push(self.value(depth + 1)?);
                    match self.next() {
                        Some(Token::Punct(',')) => {}
                        Some(Token::Punct(']')) => return Ok(Value::Array(items)),
                        other => return self.err(format!("expected ',' or ']', found {other:?}")),
                    }
                }
            }
            Some(Token::Punct('{')) => {
                let mut map = Map::new();
                loop {
                    let key = match self.next() {
                        Some(Token::Punct('}')) => return Ok(Value::Object(map)),
                        Some(Token::Punct(',')) => continue,
                        Some(Token::Str(k)) | Some(Token::Ident(k)) => k,
                        other => return self.err(format!("expected a key or '}}', found {other:?}")),
                    };
                    match self.next() {
                        Some(Token::Punct('=')) | Some(Token::Punct(':')) => {}
                        other => return self.err(format!("expected '=' after {key:?}, found {other:?}")),
                    }
                    let value = self.value(depth + 1)?;
                    map.insert(key, value);
                }
            }
            other => self.err(format!("expected a value, found {other:?}")),
        }
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
        let mut params = ParamRules::default();
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
                    } else if PARAM_KEYS.contains(&key.as_str()) {
                        let value = p.value(0)?;
                        set_param_rule(&mut params, &pattern, &key, &value)?;
                    } else if key == "comment" {
                        p.skip_value()?;
                    } else {
                        return Err(PolicyError::UnknownKey { path: pattern, key });
                    }
                    if let Some(Token::Punct(',')) = p.tokens.get(p.pos).map(|t| &t.0) {
                        p.pos += 1;
                    }
                }
                other => return p.err(format!("expected a key or '}}' in path {pattern:?}, found {other:?}")),
            }
        }
        let caps = caps.ok_or_else(|| PolicyError::NoCapabilities(pattern.clone()))?;
        rules.push(Rule { pattern, caps, params });
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

/// What a set of policies grants on one path: the capabilities and parameter constraints of the
/// most specific matching pattern, merged across the policies that name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub caps: Caps,
    pub params: ParamRules,
}

/// What a set of policies grants on `path`; `deny` grants nothing.
pub fn grant<'a>(policies: impl IntoIterator<Item = &'a Policy>, path: &str) -> Grant {
    let mut merged: BTreeMap<&str, Grant> = BTreeMap::new();
    for policy in policies {
        for rule in &policy.rules {
            if matches(&rule.pattern, path) {
                let entry = merged.entry(rule.pattern.as_str()).or_default();
                entry.caps = entry.caps.union(rule.caps);
                entry.params.merge(&rule.params);
            }
        }
    }
    let best = merged.into_iter().max_by(|a, b| specificity(a.0, b.0));
    match best {
        Some((_, grant)) if !grant.caps.contains(Caps::DENY) => grant,
        _ => Grant::default(),
    }
}

/// The capabilities a set of policies grants on `path`.
pub fn capabilities<'a>(policies: impl IntoIterator<Item = &'a Policy>, path: &str) -> Caps {
    grant(policies, path).caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn body(value: serde_json::Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn parameter_constraints_parse_from_hcl_and_json_alike() {
        let hcl = policy(
            r#"
            path "auth/userpass/users/*" {
                capabilities = ["create", "update"]
                allowed_parameters = {
                    "Password" = []
                    "token_ttl" = ["1h", 3600, true]
                }
                denied_parameters = { "token_policies" = [], "policies" = ["admin-*"] }
                required_parameters = ["password"]
            }
            "#,
        );
        let json = policy(
            r#"{"path": {"auth/userpass/users/*": {"capabilities": ["create", "update"],
                "allowed_parameters": {"password": [], "token_ttl": ["1h", 3600, true]},
                "denied_parameters": {"token_policies": [], "policies": ["admin-*"]},
                "required_parameters": ["password"]}}}"#,
        );
        assert_eq!(hcl.rules, json.rules);
        let params = &hcl.rules[0].params;
        assert_eq!(params.allowed["password"], vec![], "keys are lower-cased as Vault stores them");
        assert_eq!(params.required, vec!["password".to_string()]);
    }

    #[test]
    fn malformed_parameter_constraints_are_refused_naming_the_path_and_key() {
        for (text, key) in [
            (r#"path "a" { capabilities = ["update"] allowed_parameters = ["x"] }"#, "allowed_parameters"),
            (r#"path "a" { capabilities = ["update"] denied_parameters = { "x" = "y" } }"#, "denied_parameters"),
            (r#"path "a" { capabilities = ["update"] allowed_parameters = { "*" = ["y"] } }"#, "allowed_parameters"),
            (r#"path "a" { capabilities = ["update"] allowed_parameters = { "x" = [["y"]] } }"#, "allowed_parameters"),
            (r#"path "a" { capabilities = ["update"] required_parameters = [1] }"#, "required_parameters"),
        ] {
            match parse("p", text).unwrap_err() {
                PolicyError::BadParameters { path, key: k, .. } => assert_eq!((path.as_str(), k.as_str()), ("a", key)),
                other => panic!("{text}: {other:?}"),
            }
        }
        let deep = format!(r#"path "a" {{ capabilities = ["update"] allowed_parameters = {}"#, "[".repeat(100_000));
        assert!(matches!(parse("p", &deep).unwrap_err(), PolicyError::Syntax { .. }));
    }

    #[test]
    fn keys_citadel_does_not_enforce_are_refused_rather_than_ignored() {
        for text in [
            r#"path "a" { capabilities = ["read"] min_wrapping_ttl = "1s" }"#,
            r#"path "a" { capabilities = ["read"] denied_parameter = { "x" = [] } }"#,
            r#"{"path": {"a": {"capabilities": ["read"], "control_group": {}}}}"#,
        ] {
            assert!(matches!(parse("p", text).unwrap_err(), PolicyError::UnknownKey { .. }), "{text}");
        }
        parse("p", r#"path "a" { capabilities = ["read"] comment = "kept as text" }"#).unwrap();
        parse("p", r#"{"path": {"a": {"capabilities": ["read"], "comment": "x"}}}"#).unwrap();
    }

    #[test]
    fn required_denied_and_allowed_parameters_are_checked_in_vaults_order() {
        let p = policy(
            r#"path "x" {
                capabilities = ["update"]
                required_parameters = ["name"]
                allowed_parameters = { "name" = ["app-*", "*-svc"], "ttl" = [], "flag" = [true], "n" = [3] }
                denied_parameters = { "ttl" = ["0"] }
            }"#,
        );
        let rules = &grant([&p], "x").params;
        assert_eq!(rules.check(&body(json!({}))), Err(ParamRefusal::Missing("name".into())));
        assert_eq!(rules.check(&body(json!({ "name": "app-1", "ttl": "1h", "flag": true, "n": 3 }))), Ok(()));
        assert_eq!(rules.check(&body(json!({ "name": "db-svc" }))), Ok(()));
        assert_eq!(rules.check(&body(json!({ "name": "other" }))), Err(ParamRefusal::NotAllowed("name".into())));
        assert_eq!(rules.check(&body(json!({ "name": "app-1", "ttl": "0" }))), Err(ParamRefusal::Denied("ttl".into())));
        assert_eq!(
            rules.check(&body(json!({ "name": "app-1", "extra": 1 }))),
            Err(ParamRefusal::NotAllowed("extra".into()))
        );
        assert_eq!(
            rules.check(&body(json!({ "name": "app-1", "flag": false }))),
            Err(ParamRefusal::NotAllowed("flag".into()))
        );
    }

    #[test]
    fn list_values_are_checked_element_by_element_as_vault_1_21_does() {
        let p = policy(
            r#"path "x" {
                capabilities = ["update"]
                allowed_parameters = { "policies" = ["a", "b"], "*" = [] }
                denied_parameters = { "groups" = ["admin"] }
            }"#,
        );
        let rules = &grant([&p], "x").params;
        assert_eq!(rules.check(&body(json!({ "policies": ["a", "b"], "other": 1 }))), Ok(()));
        assert_eq!(rules.check(&body(json!({ "policies": "b,a" }))), Ok(()));
        assert!(rules.check(&body(json!({ "policies": ["a", "c"] }))).is_err());
        assert!(rules.check(&body(json!({ "policies": "a,c" }))).is_err());
        assert!(rules.check(&body(json!({ "groups": ["dev", "admin"] }))).is_err());
        assert!(rules.check(&body(json!({ "groups": "dev, admin" }))).is_err());
        assert_eq!(rules.check(&body(json!({ "groups": ["dev"] }))), Ok(()));
    }

    #[test]
    fn denying_star_refuses_any_parameter_but_not_an_empty_request() {
        let p = policy(r#"path "x" { capabilities = ["update"] denied_parameters = { "*" = [] } }"#);
        let rules = &grant([&p], "x").params;
        assert_eq!(rules.check(&Map::new()), Ok(()));
        assert!(rules.check(&body(json!({ "a": 1 }))).is_err());
    }

    #[test]
    fn constraints_on_the_same_pattern_merge_across_policies_as_vault_merges_them() {
        let narrow =
            parse("n", r#"path "x" { capabilities = ["update"] allowed_parameters = { "a" = ["1"] } }"#).unwrap();
        let wider =
            parse("w", r#"path "x" { capabilities = ["read"] allowed_parameters = { "a" = ["2"], "b" = [] } }"#)
                .unwrap();
        let any = parse("y", r#"path "x" { capabilities = ["read"] allowed_parameters = { "a" = [] } }"#).unwrap();
        let merged = grant([&narrow, &wider], "x");
        assert_eq!(merged.caps, Caps::UPDATE.union(Caps::READ));
        assert_eq!(merged.params.check(&body(json!({ "a": "2", "b": "z" }))), Ok(()));
        assert!(merged.params.check(&body(json!({ "a": "3" }))).is_err());
        let merged = grant([&narrow, &any], "x");
        assert_eq!(merged.params.check(&body(json!({ "a": "3" }))), Ok(()), "an empty list absorbs the others");
        // A rule without constraints on a more specific pattern wins outright.
        let glob = parse("g", r#"path "x*" { capabilities = ["update"] allowed_parameters = { "a" = [] } }"#).unwrap();
        let exact = parse("e", r#"path "xy" { capabilities = ["update"] }"#).unwrap();
        assert!(!grant([&glob], "xy").params.is_empty());
        assert!(grant([&glob, &exact], "xy").params.is_empty());
    }

    #[test]
    fn policies_stored_before_parameter_constraints_still_load() {
        let stored = r#"{"name":"p","raw":"","rules":[{"pattern":"a","caps":2}]}"#;
        let policy: Policy = serde_json::from_str(stored).unwrap();
        assert!(policy.rules[0].params.is_empty());
        let rule = Rule { pattern: "a".into(), caps: Caps::READ, params: ParamRules::default() };
        assert_eq!(serde_json::to_string(&rule).unwrap(), r#"{"pattern":"a","caps":2}"#);
    }

    #[test]
    fn policies_stored_without_their_constraints_regain_them_from_their_text() {
        let raw = r#"path "a" { capabilities = ["update"] allowed_parameters = { "x" = [] } }"#;
        let stored = json!({ "name": "p", "raw": raw, "rules": [{ "pattern": "a", "caps": 4 }] });
        let policy: Policy = serde_json::from_value(stored).unwrap();
        assert_eq!(policy, parse("p", raw).unwrap());
        assert!(!policy.rules[0].params.is_empty());

        let refused_now = r#"path "a" { capabilities = ["update"] allowed_parameters = { "*" = ["x"] } }"#;
        let stored = json!({ "name": "p", "raw": refused_now, "rules": [{ "pattern": "a", "caps": 4 }] });
        let policy: Policy = serde_json::from_value(stored).unwrap();
        assert!(policy.rules.is_empty(), "constraints that cannot be enforced grant nothing");

        let round_trip = parse("p", raw).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&serde_json::to_string(&round_trip).unwrap()).unwrap(), round_trip);
    }

    #[test]
    fn default_policy_lets_a_token_look_itself_up_only() {
        let d = default_policy();
        assert!(capabilities([&d], "auth/token/lookup-self").contains(Caps::READ));
        assert_eq!(capabilities([&d], "secret/data/x"), Caps::default());
    }
}

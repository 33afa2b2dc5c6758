//! The route table: every API endpoint declared once, as Vault's `sdk/framework` paths are.
//!
//! A route names its pattern, the operations it answers, what each operation needs from the
//! caller's token and whether its reads must be linearizable. The dispatcher authorizes every
//! request from this table before any handler runs, the OpenAPI document is generated from it,
//! and a test refuses every declared operation to a token without the grant. Registration
//! rejects a declaration that would leave an operation unguarded, so a forgotten capability is a
//! startup error, never a bypass.
//!
//! The table is generic over the handler type: this crate has no async runtime, and the server
//! decides what a handler is.

use std::collections::BTreeMap;
use std::fmt;

use crate::policy::Caps;
use crate::state::State;

/// What a request asks to do, as Vault's ACL sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Read,
    List,
    Write,
    Patch,
    Delete,
}

impl Op {
    /// The operation's name in audit events and errors (Vault's: a write is an `update`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::List => "list",
            Op::Write => "update",
            Op::Patch => "patch",
            Op::Delete => "delete",
        }
    }

    /// The HTTP methods that ask for this operation (LIST is also `GET ?list=true`).
    pub fn methods(self) -> &'static [&'static str] {
        match self {
            Op::Read => &["GET", "HEAD"],
            Op::List => &["LIST"],
            Op::Write => &["POST", "PUT"],
            Op::Patch => &["PATCH"],
            Op::Delete => &["DELETE"],
        }
    }

    /// The capability this operation needs where no existence check decides (a write: `update`).
    pub fn capability(self) -> Caps {
        match self {
            Op::Write => Caps::UPDATE,
            op => op.natural_caps(),
        }
    }

    /// The capabilities that can authorize this operation (a write's are decided by existence).
    fn natural_caps(self) -> Caps {
        match self {
            Op::Read => Caps::READ,
            Op::List => Caps::LIST,
            Op::Write => Caps::CREATE.union(Caps::UPDATE),
            Op::Patch => Caps::PATCH,
            Op::Delete => Caps::DELETE,
        }
    }
}

/// What an operation needs from the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// No token: the endpoint is open (health, init, unseal, join) or authenticates the caller
    /// itself (login). `while_sealed`: it is served before the seal check.
    Unauthenticated { while_sealed: bool },
    /// Every one of these capabilities on the request's path.
    Caps(Caps),
    /// Vault's existence check: `create` when the target does not exist yet, `update` when it
    /// does (`create` never authorizes an update). The route's `exists` decides.
    CreateOrUpdate,
}

/// Whether a read must see every write acknowledged before it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Served after the leader's read index (or from the replica, marked stale, in read-only
    /// mode or when the client asks for a stale read).
    Linearizable,
    /// This node's own view (health, metrics, its HA table): no read index.
    Local,
}

/// Where a documented parameter travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum In {
    Body,
    Query,
}

/// The JSON type of a documented parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    String,
    Integer,
    Boolean,
    Object,
    /// A list of strings, or a comma-separated string (Vault accepts both).
    StringList,
    /// Seconds, or a Vault duration string (`"1h30m"`).
    Duration,
    /// Integers.
    IntegerList,
}

/// A parameter an operation reads, for the OpenAPI document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    pub location: In,
    pub required: bool,
    pub description: &'static str,
}

/// One operation of a route.
#[derive(Clone, Debug)]
pub struct Operation<H> {
    pub op: Op,
    pub need: Need,
    pub consistency: Consistency,
    pub params: &'static [Param],
    pub summary: &'static str,
    pub handler: H,
}

impl<H> Operation<H> {
    /// An operation served after the leader's read index, documenting no parameters.
    pub fn new(op: Op, need: Need, summary: &'static str, handler: H) -> Operation<H> {
        Operation { op, need, consistency: Consistency::Linearizable, params: &[], summary, handler }
    }

    /// Documents the parameters the operation reads.
    pub fn with_params(mut self, params: &'static [Param]) -> Operation<H> {
        self.params = params;
        self
    }

    /// Serves this node's own view, without a read index.
    pub fn local(mut self) -> Operation<H> {
        self.consistency = Consistency::Local;
        self
    }
}

impl Param {
    pub const fn body(name: &'static str, kind: Kind, description: &'static str) -> Param {
        Param { name, kind, location: In::Body, required: false, description }
    }

    pub const fn query(name: &'static str, kind: Kind, description: &'static str) -> Param {
        Param { name, kind, location: In::Query, required: false, description }
    }

    pub const fn required(mut self) -> Param {
        self.required = true;
        self
    }
}

/// Decides Vault's existence check for a route's target, from the state, what the store holds
/// (secrets, users) and the path's captures.
pub type Exists = fn(&State, &dyn crate::state::StoreRead, &Captures) -> bool;

/// An endpoint: a pattern and the operations it answers.
#[derive(Clone, Debug)]
pub struct Route<H> {
    /// Segments separated by `/`: literals, `:name` (one segment) and a final `*name` (the rest
    /// of the path, one or more segments). Engine routes are relative to their mount.
    pub pattern: &'static str,
    pub operations: Vec<Operation<H>>,
    pub exists: Option<Exists>,
}

/// Why a declaration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// An operation declared with no capability: it would be open to every token.
    NoCapability {
        pattern: &'static str,
        op: Op,
    },
    /// The capabilities declared do not include the one the operation itself needs (a read
    /// guarded by `update`, say).
    WrongCapability {
        pattern: &'static str,
        op: Op,
    },
    /// `CreateOrUpdate` without an existence check to decide between the two.
    NoExistenceCheck {
        pattern: &'static str,
    },
    DuplicateOperation {
        pattern: &'static str,
        op: Op,
    },
    DuplicatePattern {
        pattern: &'static str,
    },
    BadPattern {
        pattern: &'static str,
        reason: &'static str,
    },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NoCapability { pattern, op } => {
                write!(f, "route {pattern:?}: {} declares no capability", op.name())
            }
            RouteError::WrongCapability { pattern, op } => {
                write!(f, "route {pattern:?}: {} must need the {0} capability", op.name())
            }
            RouteError::NoExistenceCheck { pattern } => {
                write!(f, "route {pattern:?}: create-or-update needs an existence check")
            }
            RouteError::DuplicateOperation { pattern, op } => {
                write!(f, "route {pattern:?}: {} declared twice", op.name())
            }
            RouteError::DuplicatePattern { pattern } => write!(f, "route {pattern:?} declared twice"),
            RouteError::BadPattern { pattern, reason } => write!(f, "route {pattern:?}: {reason}"),
        }
    }
}

impl std::error::Error for RouteError {}

/// The values a path gave a pattern's `:name` and `*name` segments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captures {
    /// The mount an engine route was matched under (`secret/`), empty for core routes.
    pub mount: String,
    values: BTreeMap<&'static str, String>,
}

impl Captures {
    pub fn get(&self, name: &str) -> &str {
        self.values.get(name).map_or("", String::as_str)
    }
}

/// Routes in declaration order; the first whose pattern matches a path serves it.
#[derive(Debug)]
pub struct RouteTable<H> {
    routes: Vec<Route<H>>,
}

impl<H> Default for RouteTable<H> {
    fn default() -> Self {
        RouteTable { routes: Vec::new() }
    }
}

impl<H> RouteTable<H> {
    /// Adds a route, or refuses a declaration that would leave an operation unguarded.
    pub fn register(&mut self, route: Route<H>) -> Result<(), RouteError> {
        let pattern = route.pattern;
        check_pattern(pattern)?;
        if self.routes.iter().any(|r| r.pattern == pattern) {
            return Err(RouteError::DuplicatePattern { pattern });
        }
        let mut seen = Vec::new();
        for operation in &route.operations {
            let op = operation.op;
            if seen.contains(&op) {
                return Err(RouteError::DuplicateOperation { pattern, op });
            }
            seen.push(op);
            match operation.need {
                Need::Unauthenticated { .. } => {}
                Need::Caps(caps) if caps.is_empty() => return Err(RouteError::NoCapability { pattern, op }),
                Need::Caps(caps) if !caps.intersects(op.natural_caps()) => {
                    return Err(RouteError::WrongCapability { pattern, op })
                }
                Need::Caps(_) => {}
                Need::CreateOrUpdate if op != Op::Write => return Err(RouteError::WrongCapability { pattern, op }),
                Need::CreateOrUpdate if route.exists.is_none() => return Err(RouteError::NoExistenceCheck { pattern }),
                Need::CreateOrUpdate => {}
            }
        }
        self.routes.push(route);
        Ok(())
    }

    pub fn routes(&self) -> &[Route<H>] {
        &self.routes
    }

    /// The route serving `path` and the captures of its pattern.
    pub fn lookup(&self, path: &str) -> Option<(&Route<H>, Captures)> {
        // Every request scans the table: only the route that matches allocates its captures.
        let route = self.routes.iter().find(|r| walk(r.pattern, path, |_, _| ()))?;
        let mut captures = Captures::default();
        walk(route.pattern, path, |name, value| {
            captures.values.insert(name, value.to_string());
        });
        Some((route, captures))
    }
}

impl<H> Route<H> {
    pub fn operation(&self, op: Op) -> Option<&Operation<H>> {
        self.operations.iter().find(|o| o.op == op)
    }

    /// The HTTP methods this route answers, for a 405's `Allow` header.
    pub fn allowed_methods(&self) -> Vec<&'static str> {
        let mut methods: Vec<&'static str> = self.operations.iter().flat_map(|o| o.op.methods()).copied().collect();
        if self.operation(Op::List).is_some() && !methods.contains(&"GET") {
            methods.push("GET");
        }
        methods
    }
}

fn check_pattern(pattern: &'static str) -> Result<(), RouteError> {
    let bad = |reason| Err(RouteError::BadPattern { pattern, reason });
    if pattern.starts_with('/') || pattern.ends_with('/') {
        return bad("no leading or trailing slash");
    }
    let segments: Vec<&str> = pattern.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return bad("empty segment");
        }
        if segment.starts_with('*') && i + 1 != segments.len() {
            return bad("a *rest segment must be the last");
        }
        if (segment.starts_with(':') || segment.starts_with('*')) && segment.len() == 1 {
            return bad("a capture needs a name");
        }
    }
    Ok(())
}

/// Whether `path` (no leading or trailing slash) matches `pattern`, handing each capture (its
/// name and value) to `capture` on the way; a path that fails may have handed some already.
fn walk<'p>(pattern: &'static str, path: &'p str, mut capture: impl FnMut(&'static str, &'p str)) -> bool {
    let mut rest = path;
    for segment in pattern.split('/') {
        if let Some(name) = segment.strip_prefix('*') {
            if rest.is_empty() {
                return false;
            }
            capture(name, rest);
            return true;
        }
        let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if head.is_empty() {
            return false;
        }
        match segment.strip_prefix(':') {
            Some(name) => capture(name, head),
            None if segment == head => {}
            None => return false,
        }
        rest = tail;
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operation(op: Op, need: Need) -> Operation<()> {
        Operation { op, need, consistency: Consistency::Linearizable, params: &[], summary: "", handler: () }
    }

    fn route(pattern: &'static str, operations: Vec<Operation<()>>) -> Route<()> {
        Route { pattern, operations, exists: None }
    }

    #[test]
    fn a_route_declared_without_a_capability_cannot_be_registered() {
        let mut table = RouteTable::default();
        let open = route("sys/thing", vec![operation(Op::Read, Need::Caps(Caps::default()))]);
        assert_eq!(table.register(open), Err(RouteError::NoCapability { pattern: "sys/thing", op: Op::Read }));
        assert!(table.routes().is_empty(), "a refused route is not in the table");
    }

    #[test]
    fn a_read_guarded_only_by_update_is_refused() {
        let mut table = RouteTable::default();
        let wrong = route("sys/thing", vec![operation(Op::Read, Need::Caps(Caps::UPDATE))]);
        assert_eq!(table.register(wrong), Err(RouteError::WrongCapability { pattern: "sys/thing", op: Op::Read }));
    }

    #[test]
    fn create_or_update_without_an_existence_check_is_refused() {
        let mut table = RouteTable::default();
        let unchecked = route("sys/thing/:name", vec![operation(Op::Write, Need::CreateOrUpdate)]);
        assert_eq!(table.register(unchecked), Err(RouteError::NoExistenceCheck { pattern: "sys/thing/:name" }));
    }

    #[test]
    fn duplicate_patterns_and_operations_are_refused() {
        let mut table = RouteTable::default();
        let read = || operation(Op::Read, Need::Caps(Caps::READ));
        assert_eq!(
            table.register(route("a", vec![read(), read()])),
            Err(RouteError::DuplicateOperation { pattern: "a", op: Op::Read })
        );
        table.register(route("a", vec![read()])).unwrap();
        assert_eq!(table.register(route("a", vec![read()])), Err(RouteError::DuplicatePattern { pattern: "a" }));
    }

    #[test]
    fn patterns_capture_one_segment_or_the_rest() {
        let mut table = RouteTable::default();
        let read = || vec![operation(Op::Read, Need::Caps(Caps::READ))];
        table.register(route("sys/policies/acl/:name", read())).unwrap();
        table.register(route("data/*path", read())).unwrap();
        let (r, c) = table.lookup("sys/policies/acl/ops").unwrap();
        assert_eq!((r.pattern, c.get("name")), ("sys/policies/acl/:name", "ops"));
        assert!(table.lookup("sys/policies/acl/ops/extra").is_none());
        assert!(table.lookup("sys/policies/acl").is_none());
        let (_, c) = table.lookup("data/app/db/password").unwrap();
        assert_eq!(c.get("path"), "app/db/password");
        assert!(table.lookup("data").is_none());
    }

    #[test]
    fn malformed_patterns_are_refused() {
        let mut table = RouteTable::<()>::default();
        for pattern in ["/a", "a/", "a//b", "*rest/a", "a/:"] {
            assert!(matches!(table.register(route(pattern, vec![])), Err(RouteError::BadPattern { .. })), "{pattern}");
        }
    }
}

//! The API's route table: `sys/` and `auth/` endpoints, and the routes of each secrets engine,
//! declared once (`citadel_core::route`). The dispatcher authorizes from it, the OpenAPI document
//! is generated from it, and `every_route_is_refused_without_a_grant` walks it.

use std::sync::{Arc, LazyLock};

use citadel_core::route::{Captures, Need, Op, Operation, Route, RouteError, RouteTable};
use citadel_core::state::{State, DEFAULT_USERPASS};
use futures::future::BoxFuture;

use super::{ApiError, ApiRequest, Reply};
use crate::auth::Caller;
use crate::node::Node;
use crate::seal::Unsealed;

/// Serves one operation of one route, once the dispatcher has authorized it.
pub type Handler = for<'a> fn(&'a Call<'a>) -> BoxFuture<'a, Result<Reply, ApiError>>;

/// Wraps an `async fn(&Call) -> Result<Reply, ApiError>` as a [`Handler`].
macro_rules! handler {
    ($f:path) => {
        |call| Box::pin($f(call))
    };
}
pub(crate) use handler;

/// Everything a handler may use: the node, the request, and (for authenticated routes) the
/// caller and the unsealed keys.
pub struct Call<'a> {
    pub app: &'a Arc<Node>,
    pub req: &'a ApiRequest,
    pub op: Op,
    pub captures: Captures,
    caller: Option<&'a Caller>,
    keys: Option<&'a Unsealed>,
}

impl<'a> Call<'a> {
    pub fn new(app: &'a Arc<Node>, req: &'a ApiRequest, op: Op, captures: Captures) -> Call<'a> {
        Call { app, req, op, captures, caller: None, keys: None }
    }

    pub fn authenticated(mut self, caller: &'a Caller, keys: &'a Unsealed) -> Call<'a> {
        self.caller = Some(caller);
        self.keys = Some(keys);
        self
    }

    /// For routes that authenticate the caller themselves (login).
    pub fn unsealed(mut self, keys: &'a Unsealed) -> Call<'a> {
        self.keys = Some(keys);
        self
    }

    /// The caller of an authenticated route (the dispatcher resolved it before the handler ran).
    pub fn caller(&self) -> Result<&'a Caller, ApiError> {
        self.caller.ok_or_else(|| ApiError::internal("route served without an authenticated caller"))
    }

    pub fn keys(&self) -> Result<&'a Unsealed, ApiError> {
        self.keys.ok_or_else(ApiError::sealed)
    }

    /// A `:name` or `*name` capture of the route's pattern.
    pub fn param(&self, name: &str) -> &str {
        self.captures.get(name)
    }

    /// The mount an engine route was matched under (`secret/`).
    pub fn mount(&self) -> &str {
        &self.captures.mount
    }
}

/// A secrets engine, as `sys/mounts/:path` enables it by `type`.
pub struct Engine {
    /// The `type` of its mounts (`kv`).
    pub kind: &'static str,
    /// Its routes, relative to the mount.
    pub routes: fn() -> Vec<Route<Handler>>,
    /// Checks an enable request's `options`, naming what is not supported.
    pub check_options: fn(&serde_json::Value) -> Result<(), String>,
}

/// Every secrets engine this build serves: adding one is its module plus a line here.
pub const ENGINES: &[Engine] = &[super::kv::ENGINE];

/// The engine serving mounts of `kind` (Vault's `kv-v2` is `kv` with version 2).
pub fn engine(kind: &str) -> Option<&'static Engine> {
    let kind = if kind == "kv-v2" { "kv" } else { kind };
    ENGINES.iter().find(|e| e.kind == kind)
}

/// An auth method, as `sys/auth/:path` enables it by `type`.
pub struct AuthMethod {
    /// The `type` of its mounts (`userpass`).
    pub kind: &'static str,
    /// Its routes, relative to its mount under `auth/`.
    pub routes: fn() -> Vec<Route<Handler>>,
}

/// Every auth method this build serves besides the token store.
pub const AUTH_METHODS: &[AuthMethod] = &[super::auth::USERPASS];

pub fn auth_method(kind: &str) -> Option<&'static AuthMethod> {
    AUTH_METHODS.iter().find(|m| m.kind == kind)
}

pub struct Tables {
    /// `sys/` routes and the token store's, with full paths.
    pub core: RouteTable<Handler>,
    /// Each engine's routes, relative to a mount.
    pub engines: Vec<(&'static str, RouteTable<Handler>)>,
    /// Each auth method's routes, relative to its mount under `auth/`.
    pub auth_methods: Vec<(&'static str, RouteTable<Handler>)>,
}

/// Registers each module's routes in a table of its own.
fn tables_of<T>(
    modules: &'static [T],
    kind: impl Fn(&T) -> &'static str,
    routes: impl Fn(&T) -> Vec<Route<Handler>>,
) -> Result<Vec<(&'static str, RouteTable<Handler>)>, RouteError> {
    let mut tables = Vec::new();
    for module in modules {
        let mut table = RouteTable::default();
        for route in routes(module) {
            table.register(route)?;
        }
        tables.push((kind(module), table));
    }
    Ok(tables)
}

fn build() -> Result<Tables, RouteError> {
    let mut core = RouteTable::default();
    for route in [
        super::sys::routes(),
        super::mounts::routes(),
        super::raft::routes(),
        super::audit_query::routes(),
        super::snapshot_auto::routes(),
        super::alerts::routes(),
    ]
    .into_iter()
    .flatten()
    .chain(super::policy::routes())
    .chain(super::auth::routes())
    {
        core.register(route)?;
    }
    let engines = tables_of(ENGINES, |e| e.kind, |e| (e.routes)())?;
    let auth_methods = tables_of(AUTH_METHODS, |m| m.kind, |m| (m.routes)())?;
    Ok(Tables { core, engines, auth_methods })
}

static TABLES: LazyLock<Result<Tables, RouteError>> = LazyLock::new(build);

/// The route table, or the declaration error that keeps the server from starting.
pub fn tables() -> Result<&'static Tables, &'static RouteError> {
    TABLES.as_ref()
}

/// The route serving `path`: a `sys/` or token store route, a route of the auth method mounted
/// under `auth/`, or a route of the secrets engine mounted there.
pub fn resolve(app: &Node, path: &str) -> Option<(&'static Route<Handler>, Captures)> {
    let tables = tables().ok()?;
    if let Some(found) = tables.core.lookup(path) {
        return Some(found);
    }
    let (mount, rest, kind, methods) = match path.strip_prefix("auth/") {
        Some(under_auth) => {
            let (mount, rest, kind) = app.state.read(|s| auth_mount_of(s, under_auth))?;
            (mount, rest, kind, &tables.auth_methods)
        }
        None => {
            let (mount, rest, kind) = app.state.read(|s| {
                let (mount, rest) = s.route(path)?;
                Some((mount.to_string(), rest.to_string(), s.mounts.get(mount)?.kind.clone()))
            })?;
            (mount, rest, kind, &tables.engines)
        }
    };
    let (_, table) = methods.iter().find(|(k, _)| *k == kind)?;
    let (route, mut captures) = table.lookup(rest.trim_matches('/'))?;
    captures.mount = mount;
    Some((route, captures))
}

/// The auth mounts: the built-in `userpass/` and those enabled with `sys/auth/:path`, as
/// (path under `auth/`, method).
pub fn auth_mounts(state: &State) -> Vec<(String, String)> {
    each_auth_mount(state).map(|(path, kind)| (path.to_string(), kind.to_string())).collect()
}

fn each_auth_mount(state: &State) -> impl Iterator<Item = (&str, &str)> {
    let enabled = state.auth_mounts.iter().map(|(path, m)| (path.as_str(), m.kind.as_str()));
    std::iter::once((DEFAULT_USERPASS, "userpass")).chain(enabled)
}

/// The auth mount serving `path` (under `auth/`): (mount, the rest, method). Runs on every
/// request under `auth/`, so it copies only the mount it finds.
fn auth_mount_of(state: &State, path: &str) -> Option<(String, String, String)> {
    each_auth_mount(state)
        .filter(|(mount, _)| path.starts_with(mount))
        .max_by_key(|(mount, _)| mount.len())
        .map(|(mount, kind)| (mount.to_string(), path[mount.len()..].to_string(), kind.to_string()))
}

/// Whether a route is open without a token, so that a wrong method is a 405 before any token
/// check (as for `POST sys/health`).
pub fn is_unauthenticated(route: &Route<Handler>) -> bool {
    route.operations.iter().any(|o| matches!(o.need, Need::Unauthenticated { .. }))
}

/// Shorthands for declaring operations.
pub mod op {
    use citadel_core::policy::Caps;
    use citadel_core::route::{Need, Op, Operation};

    use super::Handler;

    pub fn read(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::Read, Need::Caps(Caps::READ), summary, handler)
    }
    pub fn list(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::List, Need::Caps(Caps::LIST), summary, handler)
    }
    /// A write that acts rather than stores (Vault's paths without an existence check): `update`.
    pub fn update(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::Write, Need::Caps(Caps::UPDATE), summary, handler)
    }
    /// A write that creates or replaces what the route names: `create` or `update`.
    pub fn write(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::Write, Need::CreateOrUpdate, summary, handler)
    }
    pub fn patch(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::Patch, Need::Caps(Caps::PATCH), summary, handler)
    }
    pub fn delete(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::Delete, Need::Caps(Caps::DELETE), summary, handler)
    }
    /// An operation that also needs `sudo` (Vault's root-protected paths).
    pub fn sudo(op: Op, summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(op, Need::Caps(op.capability().union(Caps::SUDO)), summary, handler)
    }
    /// Open without a token, served even while sealed (health, init, unseal, join).
    pub fn open(op: Op, summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(op, Need::Unauthenticated { while_sealed: true }, summary, handler).local()
    }
    /// Open without a token once unsealed: the handler authenticates the caller (login).
    pub fn login(summary: &'static str, handler: Handler) -> Operation<Handler> {
        Operation::new(Op::Write, Need::Unauthenticated { while_sealed: false }, summary, handler)
    }
}

/// A route with no existence check.
pub fn route(pattern: &'static str, operations: Vec<Operation<Handler>>) -> Route<Handler> {
    Route { pattern, operations, exists: None }
}

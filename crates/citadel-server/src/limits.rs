//! Caps on connections (§8.3): how many a listener and a source address may hold open, and how
//! long a connection may take to handshake, to send its headers, or to sit idle.
//!
//! Without them, a client that opens connections and sends nothing holds a file descriptor and
//! a task each until the node runs out of descriptors and stops answering everyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::LimitsConfig;

/// Refused connections are reported at most once per this interval (with their count), so a
/// flood of them cannot flood the log too.
pub const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// One listener's connection caps and timeouts, and the connections it holds open now.
pub struct ConnectionLimits {
    /// Names the listener in warnings (`api`, `cluster`).
    listener: &'static str,
    max_total: usize,
    max_per_source: usize,
    pub handshake_timeout: Duration,
    header_read_timeout: Duration,
    /// `None` on the cluster listener: see [`ConnectionLimits::new`].
    idle_timeout: Option<Duration>,
    open: Mutex<OpenConnections>,
    /// Refused since the last warning.
    refused: AtomicU64,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// A slot held by one open connection; dropping it frees the slot.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    source: IpAddr,
}

impl ConnectionLimits {
    /// `close_idle` is false for the cluster listener: its connections are members' long-lived,
    /// multiplexed HTTP/2 channels, authenticated by certificate in the (time-bounded) handshake;
    /// closing one when idle would only make a forwarded request race the close.
    pub fn new(listener: &'static str, config: &LimitsConfig, close_idle: bool) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            listener,
            max_total: config.max_connections,
            max_per_source: config.max_connections_per_source,
            handshake_timeout: Duration::from_millis(config.tls_handshake_timeout_ms),
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            idle_timeout: close_idle.then(|| Duration::from_millis(config.idle_timeout_ms)),
            open: Mutex::new(OpenConnections::default()),
            refused: AtomicU64::new(0),
        })
    }

    /// A slot for a new connection from `source`, or `None` (counted) when the listener or the
    /// source is at its cap: the caller closes the connection at once.
    pub fn try_admit(self: &Arc<Self>, source: IpAddr) -> Option<ConnectionPermit> {
        let source = source.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = open.per_source.get(&source).copied().unwrap_or(0);
        if open.total >= self.max_total || from_source >= self.max_per_source {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.total += 1;
        *open.per_source.entry(source).or_default() += 1;
        Some(ConnectionPermit { limits: self.clone(), source })
    }

    fn release(&self, source: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                open.per_source.remove(&source);
            }
        }
    }

    /// Logs one warning per interval while connections are being refused, with their count.
    pub async fn report_refusals(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REFUSAL_WARNING_INTERVAL).await;
            let refused = self.refused.swap(0, Ordering::Relaxed);
            if refused > 0 {
                tracing::warn!(
                    listener = self.listener,
                    refused,
                    max_connections = self.max_total,
                    max_connections_per_source = self.max_per_source,
                    "connections refused: the listener or their source address is at its connection cap"
                );
            }
        }
    }

    #[cfg(test)]
    fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.release(self.source);
    }
}

/// When a connection last finished a request, and how many it has in flight.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// Marks a request in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Marks a response whose body is streamed (`GET sys/events`).
#[derive(Clone, Copy, Debug)]
pub struct Streaming;

/// Holds `busy` until the body has been written out (or the client went away).
fn busy_until_end(body: axum::body::Body, busy: Busy) -> axum::body::Body {
    use futures::StreamExt;
    axum::body::Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &busy;
        chunk
    }))
}

/// Serves HTTP/1.1 or HTTP/2 (whichever the peer speaks) on one connection, with the header
/// read timeout, and closes the connection once it has had no request in flight for the idle
/// timeout (this also covers a peer that never sends a first byte).
pub async fn serve_connection<I>(io: I, router: Router, limits: &ConnectionLimits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity { in_flight: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let busy = activity.begin();
            let router = router.clone();
            async move {
                let response = tower::ServiceExt::oneshot(router, request).await;
                match response {
                    // A streamed answer keeps the connection busy until its body ends, or the
                    // idle timeout would cut a live event stream.
                    Ok(r) if r.extensions().get::<Streaming>().is_some() => {
                        Ok(r.map(|body| busy_until_end(body, busy)))
                    }
                    other => {
                        drop(busy);
                        other
                    }
                }
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let Some(idle_timeout) = limits.idle_timeout else {
        let _ = connection.await;
        return;
    };
    loop {
        let idle = activity.idle_for();
        let check_in = idle_timeout.saturating_sub(idle);
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = tokio::time::sleep(check_in) => {
                if activity.idle_for() >= idle_timeout {
                    break;
                }
            }
        }
    }
    // Idle: let a response still being written finish, within one more idle period.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(idle_timeout, connection).await;
}

/// Raises this process's soft limit on open files to its hard limit, so that the connection
/// caps, not the descriptor limit, decide when connections are refused.
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass, which lives on our stack.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
            return;
        }
        if limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
            return;
        }
        tracing::debug!(from = before, to = limit.rlim_cur, "raised the open-file limit");
    }
}

/// Makes glibc's allocator return large blocks (Argon2's ~19 MiB per hash) to the system when
/// they are freed, for a process that allocates through it (the `citadel` binary allocates
/// through jemalloc, which returns them itself: a login burst left a node 1.6 MiB larger).
/// glibc otherwise raises its mmap threshold after the first such free and keeps later ones in
/// per-thread arenas: a burst of logins on the blocking pool's threads then left the node
/// ~200 MiB larger for good (measured by `citadel bench flood`). An explicit threshold turns that
/// adjustment off, so memory for hashes is bounded by the hash pool while it runs and then released.
pub fn release_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before other threads allocate much.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) != 1 {
            tracing::warn!("cannot set the allocator's mmap threshold; password hashing may keep memory");
        }
    }
}

/// Audit fields are capped by the node's audit layer; re-exported for the API's callers.
pub use crate::audit::cap_for_audit;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_source: usize) -> Arc<ConnectionLimits> {
        let config =
            LimitsConfig { max_connections: total, max_connections_per_source: per_source, ..Default::default() };
        ConnectionLimits::new("test", &config, true)
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share_of_connections() {
        let limits = limits(10, 3);
        let flooder: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| limits.try_admit(flooder).expect("within the cap")).collect();
        assert!(limits.try_admit(flooder).is_none(), "the fourth from one source is refused");
        assert!(limits.try_admit("127.0.0.1".parse().unwrap()).is_some(), "another source still gets in");
        drop(held);
        assert_eq!(limits.open_count(), 0, "closing connections frees their slots");
        assert!(limits.try_admit(flooder).is_some());
        assert_eq!(limits.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_listener_cap_holds_across_sources() {
        let limits = limits(4, 4);
        let held: Vec<_> =
            (1..=4).map(|i| limits.try_admit(IpAddr::from([10, 0, 0, i])).expect("within the cap")).collect();
        assert!(limits.try_admit(IpAddr::from([10, 0, 0, 9])).is_none());
        assert_eq!(held.len(), 4);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_source() {
        let limits = limits(10, 1);
        let _held = limits.try_admit("10.0.0.1".parse().unwrap()).unwrap();
        assert!(limits.try_admit("::ffff:10.0.0.1".parse().unwrap()).is_none());
    }
}

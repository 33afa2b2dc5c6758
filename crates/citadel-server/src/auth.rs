//! Who is calling, and what may they do: token resolution, ACL checks, password hashing and the
//! login limiter and the bounded pool that runs password hashes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use citadel_core::barrier::Keyring;
use citadel_core::policy::{self, Caps};
use citadel_core::state::State;
use citadel_core::token::{hashes_equal, token_hash, verify_emergency, TokenEntry, EMERGENCY_PREFIX};
use citadel_core::token_table::TokenRead;
use sha2::{Digest, Sha256};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub entry: TokenEntry,
    /// Emergency tokens (issued in read-only mode) may only read and list.
    pub read_only: bool,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.entry.policies.iter().any(|p| p == policy::ROOT)
    }

    pub fn name(&self) -> String {
        self.entry.username.clone().unwrap_or_else(|| self.entry.display_name.clone())
    }

    /// What this caller's policies grant on `path`.
    pub fn capabilities(&self, state: &State, path: &str) -> Caps {
        if self.is_root() {
            return Caps::ALL;
        }
        policy::capabilities(state.policies_named(&self.entry.policies), path)
    }

    /// What this caller's policies grant on `path`, with the parameter constraints that come with
    /// it (root has every capability and no constraints).
    pub fn grant(&self, state: &State, path: &str) -> policy::Grant {
        if self.is_root() {
            return policy::Grant { caps: Caps::ALL, params: Default::default() };
        }
        policy::grant(state.policies_named(&self.entry.policies), path)
    }
}

/// Looks a presented token up by its keyed hash, or verifies an emergency token's signature
/// under the current keyring term; expired, used-up and revoked tokens do not authenticate.
pub fn resolve(state: &State, tokens: &dyn TokenRead, keyring: &Keyring, token: &str, now: u64) -> Option<Caller> {
    let hash = token_hash(&keyring.token_hmac_key, token);
    if token.starts_with(EMERGENCY_PREFIX) {
        let (term, key) = keyring.emergency_signing_key();
        let claims = verify_emergency(&key, term, token, now)?;
        if state.revoked_emergency.contains_key(&hash) {
            return None;
        }
        let entry = TokenEntry {
            hash,
            display_name: format!("emergency-{}", claims.username),
            created: claims.issued,
            expires: Some(claims.expires),
            max_expires: Some(claims.expires),
            ttl_secs: claims.expires.saturating_sub(claims.issued) / 1000,
            policies: claims.policies,
            username: Some(claims.username),
            ..TokenEntry::default()
        };
        return Some(Caller { entry, read_only: true });
    }
    let entry = match tokens.token(&hash) {
        Ok(entry) => entry?,
        Err(e) => {
            // Refused, never served from a damaged record: the log says which file.
            tracing::error!(error = %e, "cannot read the stored tokens");
            return None;
        }
    };
    if !hashes_equal(&entry.hash, &hash) || !entry.is_usable(now) {
        return None;
    }
    Some(Caller { entry, read_only: false })
}

fn argon2() -> Argon2<'static> {
    Argon2::default()
}

/// Argon2id with a fresh random salt. CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2().hash_password(password.as_bytes(), &salt).expect("argon2 hashing with valid parameters").to_string()
}

/// Verifies a password; with no stored hash, burns the same time so that unknown users cannot be
/// told apart from wrong passwords.
pub fn verify_password(stored: Option<&str>, password: &str) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("citadel-timing-equaliser"));
    let (hash, real) = match stored {
        Some(h) => (h, true),
        None => (dummy.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    argon2().verify_password(password.as_bytes(), &parsed).is_ok() && real
}

/// Throttles password guessing with backoff rather than lockout (§8.3). Failures are counted per
/// user-and-source pair (so nobody can slow a user down from another address) and per source
/// address (so one address cannot spray many user names). Both are checked and charged together,
/// under one lock, before the password is hashed: concurrent guesses cannot slip past the count.
/// A success refunds its charge. The table is bounded; the least recently used entry goes first.
pub struct LoginLimiter {
    table: Mutex<LimiterTable>,
    policy: BackoffPolicy,
}

/// When failures start to cost time, and how much.
#[derive(Clone, Copy, Debug)]
pub struct BackoffPolicy {
    /// Failures a user-and-source pair may make before backoff starts.
    pub pair_free_failures: u32,
    /// Failures a source address may make (over all users) before backoff starts.
    pub source_free_failures: u32,
    pub base: Duration,
    pub max: Duration,
    /// Entries kept at most (pairs and sources together).
    pub max_entries: usize,
}

impl BackoffPolicy {
    pub fn from_config(limits: &crate::config::LimitsConfig) -> BackoffPolicy {
        BackoffPolicy {
            pair_free_failures: limits.login_free_failures,
            source_free_failures: limits.login_source_free_failures,
            base: Duration::from_millis(limits.login_backoff_base_ms),
            max: Duration::from_millis(limits.login_backoff_max_ms),
            max_entries: limits.login_limiter_entries,
        }
    }

    /// The wait after `failures` failures: none while free, then base × 2^k, capped.
    fn delay(&self, failures: u32, free: u32) -> Duration {
        let Some(k) = failures.checked_sub(free).and_then(|over| over.checked_sub(1)) else {
            return Duration::ZERO;
        };
        let factor = 1u32.checked_shl(k.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LimiterKey {
    Source(String),
    /// The user name is kept as a fixed-size digest: login paths can be long.
    Pair {
        source: String,
        user: [u8; 32],
    },
}

struct LimiterEntry {
    failures: u32,
    last_failure: Instant,
    /// The entry's place in `by_use`.
    used: u64,
}

#[derive(Default)]
struct LimiterTable {
    entries: HashMap<LimiterKey, LimiterEntry>,
    /// Least recently used first.
    by_use: BTreeMap<u64, LimiterKey>,
    clock: u64,
}

/// A failure charged before the password check; hand it back with [`LoginLimiter::succeeded`].
#[must_use = "a successful login must refund its charge"]
pub struct LoginCharge {
    pair: LimiterKey,
    source: LimiterKey,
}

impl LoginLimiter {
    pub fn new(policy: BackoffPolicy) -> LoginLimiter {
        LoginLimiter { table: Mutex::new(LimiterTable::default()), policy }
    }

    /// Checks the pair and the source and, if neither must wait, charges both a failure.
    /// `Err(wait)` says how long until an attempt is accepted; nothing is charged then.
    pub fn check_and_charge(&self, source: &str, user: &str) -> Result<LoginCharge, Duration> {
        self.check_and_charge_at(source, user, Instant::now())
    }

    fn check_and_charge_at(&self, source: &str, user: &str, now: Instant) -> Result<LoginCharge, Duration> {
        let pair = LimiterKey::Pair { source: source.to_string(), user: Sha256::digest(user.as_bytes()).into() };
        let source = LimiterKey::Source(source.to_string());
        let policy = self.policy;
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let wait = table.wait_for_both(&pair, &source, &policy, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        table.charge(&pair, now, policy.max_entries);
        table.charge(&source, now, policy.max_entries);
        Ok(LoginCharge { pair, source })
    }

    /// A correct password: the pair starts afresh and the source gets its charge back.
    pub fn succeeded(&self, charge: LoginCharge) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(&charge.pair);
        if let Some(entry) = table.entries.get_mut(&charge.source) {
            entry.failures = entry.failures.saturating_sub(1);
        }
    }

    /// The attempt was never checked (no hashing slot): both keys get their charge back.
    pub fn refund(&self, charge: LoginCharge) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for key in [&charge.pair, &charge.source] {
            if let Some(entry) = table.entries.get_mut(key) {
                entry.failures = entry.failures.saturating_sub(1);
            }
        }
    }

    #[cfg(test)]
    fn wait_at(&self, source: &str, user: &str, now: Instant) -> Duration {
        let pair = LimiterKey::Pair { source: source.to_string(), user: Sha256::digest(user.as_bytes()).into() };
        let source = LimiterKey::Source(source.to_string());
        self.table.lock().unwrap_or_else(|p| p.into_inner()).wait_for_both(&pair, &source, &self.policy, now)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).entries.len()
    }
}

impl LimiterTable {
    fn wait_for_both(
        &mut self,
        pair: &LimiterKey,
        source: &LimiterKey,
        policy: &BackoffPolicy,
        now: Instant,
    ) -> Duration {
        let pair_wait = self.wait(pair, policy.pair_free_failures, policy, now);
        let source_wait = self.wait(source, policy.source_free_failures, policy, now);
        pair_wait.max(source_wait)
    }

    /// How long `key` must still wait; forgets an entry that has been quiet for `max` after its
    /// backoff ended.
    fn wait(&mut self, key: &LimiterKey, free: u32, policy: &BackoffPolicy, now: Instant) -> Duration {
        let Some(entry) = self.entries.get(key) else { return Duration::ZERO };
        let delay = policy.delay(entry.failures, free);
        let allowed_at = entry.last_failure + delay;
        if now >= allowed_at + policy.max {
            self.remove(key);
            return Duration::ZERO;
        }
        // Within the free failures nothing waits. `now` is read before the table's lock, so a
        // concurrent attempt may have charged a failure stamped a moment later: measured from it,
        // a zero delay would still leave a few microseconds to wait, and a burst of logins from
        // one address got "too many failed logins" with none failed (limits test, busy machine).
        if delay.is_zero() {
            return Duration::ZERO;
        }
        allowed_at.saturating_duration_since(now)
    }

    fn charge(&mut self, key: &LimiterKey, now: Instant, max_entries: usize) {
        self.clock += 1;
        let used = self.clock;
        if let Some(entry) = self.entries.get_mut(key) {
            self.by_use.remove(&entry.used);
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = now;
            entry.used = used;
        } else {
            while self.entries.len() >= max_entries {
                let Some((_, oldest)) = self.by_use.pop_first() else { break };
                self.entries.remove(&oldest);
            }
            self.entries.insert(key.clone(), LimiterEntry { failures: 1, last_failure: now, used });
        }
        self.by_use.insert(used, key.clone());
    }

    fn remove(&mut self, key: &LimiterKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_use.remove(&entry.used);
        }
    }
}

/// Runs Argon2 hashes on its own `permits` threads, so at most that many run at once (§8.3):
/// each hash holds ~19 MiB, and an unbounded number of concurrent logins could exhaust the node's
/// memory. The threads run at a lower scheduling priority than the rest of the node: on a small
/// machine a burst of hashes must not starve Raft's heartbeats or the requests being served
/// (`citadel bench flood` saw a linearizable read miss its quorum round while hashes ran).
pub struct HashPool {
    permits: Arc<tokio::sync::Semaphore>,
    wait: Duration,
    jobs: Mutex<std::sync::mpsc::Sender<HashJob>>,
}

type HashJob = Box<dyn FnOnce() + Send>;

/// Niceness of the hashing threads (0 is the node's own; 19 the lowest priority).
const HASH_THREAD_NICENESS: i32 = 10;

/// Every hashing slot stayed busy for the whole wait.
#[derive(Debug, PartialEq, Eq)]
pub struct PoolBusy;

impl HashPool {
    pub fn new(permits: usize, wait: Duration) -> HashPool {
        let (jobs, queue) = std::sync::mpsc::channel::<HashJob>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..permits {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("citadel-hash-{i}")).spawn(move || {
                lower_this_threads_priority();
                loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else { return };
                    // A panicking hash must not take its thread (and so a slot) with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-hashing thread");
            }
        }
        HashPool { permits: Arc::new(tokio::sync::Semaphore::new(permits)), wait, jobs: Mutex::new(jobs) }
    }

    /// Runs `work` on a hashing thread once a slot is free, waiting at most the pool's wait.
    /// The slot is held until `work` returns, even if the caller gives up meanwhile.
    pub async fn run<R: Send + 'static>(&self, work: impl FnOnce() -> R + Send + 'static) -> Result<R, PoolBusy> {
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PoolBusy)?
            .map_err(|_| PoolBusy)?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move || {
            let output = work();
            drop(permit);
            let _ = done.send(output);
        });
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).send(job).map_err(|_| PoolBusy)?;
        result.await.map_err(|_| PoolBusy)
    }

    /// Seconds a refused caller should wait before retrying.
    pub fn retry_after_secs(&self) -> u64 {
        self.wait.as_secs().max(1)
    }
}

/// On Linux, `setpriority(PRIO_PROCESS, 0, ..)` sets the calling thread's niceness only.
fn lower_this_threads_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, HASH_THREAD_NICENESS) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the hashing threads' priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let hash = hash_password("correct horse");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(Some(&hash), "correct horse"));
        assert!(!verify_password(Some(&hash), "wrong"));
        assert!(!verify_password(None, "citadel-timing-equaliser"));
    }

    fn policy(max_entries: usize) -> BackoffPolicy {
        BackoffPolicy {
            pair_free_failures: 2,
            source_free_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_entries,
        }
    }

    #[test]
    fn an_attempt_whose_clock_reading_predates_a_concurrent_charge_is_not_throttled_within_free_failures() {
        let limiter = LoginLimiter::new(policy(100));
        let read_first = Instant::now();
        // Another login read the clock later but took the lock first.
        let _charged = limiter.check_and_charge_at("10.0.0.8", "alice", read_first + Duration::from_micros(5)).unwrap();
        assert!(limiter.check_and_charge_at("10.0.0.8", "bob", read_first).is_ok(), "one failure of five free");
    }

    #[test]
    fn failures_from_one_source_do_not_delay_the_same_user_from_another() {
        let limiter = LoginLimiter::new(policy(100));
        let now = Instant::now();
        for _ in 0..3 {
            let _ = limiter.check_and_charge_at("10.0.0.66", "alice", now).unwrap();
        }
        assert!(limiter.check_and_charge_at("10.0.0.66", "alice", now).is_err(), "the guessing source waits");
        let charge = limiter.check_and_charge_at("10.0.0.7", "alice", now).expect("alice from her own address");
        limiter.succeeded(charge);
    }

    #[test]
    fn a_source_spraying_user_names_is_slowed_down() {
        let limiter = LoginLimiter::new(policy(100));
        let now = Instant::now();
        for i in 0..6 {
            let _ = limiter.check_and_charge_at("10.0.0.66", &format!("user{i}"), now).unwrap();
        }
        assert!(limiter.check_and_charge_at("10.0.0.66", "user-new", now).is_err());
        assert!(limiter.check_and_charge_at("10.0.0.7", "user-new", now).is_ok());
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap() {
        let p = policy(100);
        let delays: Vec<u64> = (0..12).map(|f| p.delay(f, 2).as_secs()).collect();
        assert_eq!(delays, [0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(p.delay(u32::MAX, 2), Duration::from_secs(60));

        let limiter = LoginLimiter::new(p);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..6 {
            let _failed = limiter.check_and_charge_at("s", "u", now).expect("accepted once its backoff passed");
            let wait = limiter.wait_at("s", "u", now);
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [0, 0, 1, 2, 4, 8]);
    }

    #[test]
    fn concurrent_attempts_are_charged_before_any_is_checked() {
        // Charging happens in the same critical section as the check: of many simultaneous
        // guesses only the free ones (plus the first charged) pass, whatever their interleaving.
        let limiter = Arc::new(LoginLimiter::new(policy(100)));
        let now = Instant::now();
        let handles: Vec<_> = (0..32)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || limiter.check_and_charge_at("10.0.0.66", "alice", now).is_ok())
            })
            .collect();
        let passed = handles.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count();
        assert_eq!(passed, 3, "two free failures and the one that starts the backoff");
    }

    #[test]
    fn success_refunds_the_charge() {
        let limiter = LoginLimiter::new(policy(100));
        let now = Instant::now();
        for _ in 0..10 {
            let charge = limiter.check_and_charge_at("10.0.0.7", "alice", now).expect("never delayed");
            limiter.succeeded(charge);
        }
    }

    #[test]
    fn the_limiter_table_stays_bounded_and_evicts_the_least_recently_used() {
        let limiter = LoginLimiter::new(policy(50));
        let now = Instant::now();
        for i in 0..1000 {
            let _ = limiter.check_and_charge_at(&format!("10.0.{}.{}", i / 256, i % 256), "bob", now);
            assert!(limiter.len() <= 50);
        }
        assert_eq!(limiter.len(), 50);
    }

    #[test]
    fn quiet_entries_are_forgotten() {
        let limiter = LoginLimiter::new(policy(100));
        let now = Instant::now();
        for _ in 0..3 {
            let _ = limiter.check_and_charge_at("s", "u", now).unwrap();
        }
        assert!(limiter.check_and_charge_at("s", "u", now).is_err());
        let later = now + Duration::from_secs(62);
        assert!(limiter.check_and_charge_at("s", "u", later).is_ok());
        assert_eq!(limiter.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_pool_never_runs_more_than_its_permits_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = Arc::new(HashPool::new(3, Duration::from_secs(30)));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..24)
            .map(|_| {
                let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    pool.run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        let _ = hash_password("pool-test");
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().expect("every hash gets a slot within the wait");
        }
        assert!(peak.load(Ordering::SeqCst) <= 3, "peak {}", peak.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_full_pool_refuses_after_its_wait() {
        let pool = Arc::new(HashPool::new(1, Duration::from_millis(50)));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move || hold.recv().ok()).await })
        };
        let started = Instant::now();
        while pool.permits.available_permits() > 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "the first job never started");
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.run(|| ()).await, Err(PoolBusy));
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert_eq!(pool.run(|| ()).await, Ok(()));
    }
}

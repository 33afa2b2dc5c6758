//! Notices when this process was stopped: a virtual machine's stall, `SIGSTOP`, a laptop's
//! sleep. Time that passed while the node was not running is no evidence of anything: its
//! leader's heartbeats and its peers' answers could not arrive, and every one of them is a
//! moment away once it runs again. So a judgement of silence (read-only mode settled, a quorum
//! lost, a member unreachable, a request's deadline) counts only time since the last resume.
//!
//! A stall shows as a gap between looks: the event watcher looks every 100 ms, and every
//! judgement looks too, so the first one after a stall sees it, whichever task runs first.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Looks further apart than this mean the process was stopped in between. A thread starved
/// for longer on a busy machine counts as stopped too: the node then waits longer before it
/// judges, never less.
pub const GAP: Duration = Duration::from_millis(500);

/// When this process last looked at the time, and when it last resumed (or started).
#[derive(Debug)]
pub struct StallWatch {
    looks: Mutex<Looks>,
}

#[derive(Clone, Copy, Debug)]
struct Looks {
    last: Instant,
    resumed: Instant,
}

impl StallWatch {
    pub fn new(now: Instant) -> StallWatch {
        StallWatch { looks: Mutex::new(Looks { last: now, resumed: now }) }
    }

    /// A look at `now`: since when this process has run without a gap.
    pub fn look_at(&self, now: Instant) -> Instant {
        let mut looks = self.looks.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(looks.last) > GAP {
            looks.resumed = now;
        }
        looks.last = looks.last.max(now);
        looks.resumed
    }

    /// A look now: since when this process has run without a gap.
    pub fn running_since(&self) -> Instant {
        self.look_at(Instant::now())
    }

    /// How long this process has run, without a gap, since `from`.
    pub fn watched_since(&self, from: Instant) -> Duration {
        let now = Instant::now();
        now.saturating_duration_since(from.max(self.look_at(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_between_looks_is_a_resume_and_regular_looks_are_not() {
        let t0 = Instant::now();
        let watch = StallWatch::new(t0);
        let ms = Duration::from_millis;
        for step in 1..=20 {
            assert_eq!(watch.look_at(t0 + ms(100 * step)), t0, "looks 100 ms apart: running since the start");
        }
        // Stopped for 2 s after the look at 2 s.
        let resumed = t0 + ms(4_000);
        assert_eq!(watch.look_at(resumed), resumed);
        assert_eq!(watch.look_at(resumed + ms(100)), resumed);
        // A look from a task that read the clock before another's later look is no gap.
        assert_eq!(watch.look_at(resumed + ms(50)), resumed);
        assert_eq!(watch.look_at(resumed + ms(100) + GAP), resumed, "a gap of exactly GAP is not a stall");
    }
}

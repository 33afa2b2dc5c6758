//! The `citadel` binary's library: the command line ([`cli`]), the local dev cluster ([`dev`])
//! and the load generator ([`bench`]). Integration tests reuse [`dev::Layout`] to start real
//! server processes exactly as `citadel dev` does.

/// `println!` that ignores a closed stdout (e.g. `citadel kv list | head`) instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod alert_bench;
pub mod bench;
pub mod chart;
pub mod cli;
pub mod dev;
pub mod flood;
pub mod output;
pub mod scale;

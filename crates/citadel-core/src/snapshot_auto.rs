//! Scheduled snapshots (§10.2, Vault's automated-snapshot API): each named configuration says
//! how often, how many to keep and where; its status says how the last run went. Both are
//! replicated, so a new leader picks the schedule up where the old one left it.
//!
//! Validation lives here, beside the types, so that `apply` refuses exactly what the API
//! refuses (a faulty or hostile proposer meets the same bounds).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// Configurations a cluster may hold.
pub const MAX_CONFIGS: usize = 16;
pub const MAX_NAME_BYTES: usize = 64;
pub const MAX_PATH_BYTES: usize = 1024;
pub const MAX_RETAIN: u32 = 1000;
/// A year: a schedule rarer than that is a mistake.
pub const MAX_INTERVAL_SECS: u64 = 366 * 86_400;
/// Bounds the error text a status keeps.
pub const MAX_ERROR_BYTES: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoSnapshotConfig {
    pub interval_secs: u64,
    pub retain: u32,
    /// The directory on the leader's disk (storage type `local`, the only one supported).
    pub path_prefix: String,
    pub file_prefix: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoSnapshotStatus {
    /// 0: never ran.
    pub last_snapshot_start: UnixMillis,
    pub last_snapshot_end: UnixMillis,
    /// Empty when the last run succeeded.
    pub last_snapshot_error: String,
    /// `file://` and the path of the last snapshot written.
    pub last_snapshot_url: String,
    pub last_snapshot_size: u64,
    pub consecutive_errors: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoSnapshot {
    pub config: AutoSnapshotConfig,
    pub status: AutoSnapshotStatus,
}

impl AutoSnapshot {
    /// When the next run is due (a new schedule runs at once).
    pub fn next_start(&self) -> UnixMillis {
        match self.status.last_snapshot_start {
            0 => 0,
            last => last.saturating_add(self.config.interval_secs.saturating_mul(1000)),
        }
    }
}

/// Why a configuration is refused; every message names the field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ConfigError {
    #[error("name must be 1 to {MAX_NAME_BYTES} bytes of letters, digits, '.', '_' or '-'")]
    Name,
    #[error("interval must be between 1 second and {MAX_INTERVAL_SECS} seconds")]
    Interval,
    #[error("retain must be between 1 and {MAX_RETAIN}")]
    Retain,
    #[error("path_prefix must be an absolute directory path of at most {MAX_PATH_BYTES} bytes")]
    PathPrefix,
    #[error("file_prefix must be 1 to {MAX_NAME_BYTES} bytes of letters, digits, '.', '_' or '-'")]
    FilePrefix,
    #[error("at most {MAX_CONFIGS} scheduled snapshot configurations may exist; delete one first")]
    TooMany,
    /// Retention would delete the other configuration's files: its files are named alike.
    #[error("configuration {0:?} already writes {1}/{2}-*.snap; give this one another file_prefix or path_prefix")]
    SameFiles(String, String, String),
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.starts_with('.')
}

/// Checks a configuration (and its name) on its own.
pub fn check(name: &str, config: &AutoSnapshotConfig) -> Result<(), ConfigError> {
    if !is_simple_name(name) {
        return Err(ConfigError::Name);
    }
    if !(1..=MAX_INTERVAL_SECS).contains(&config.interval_secs) {
        return Err(ConfigError::Interval);
    }
    if !(1..=MAX_RETAIN).contains(&config.retain) {
        return Err(ConfigError::Retain);
    }
    let path = &config.path_prefix;
    if !path.starts_with('/')
        || path.len() > MAX_PATH_BYTES
        || path.contains('\0')
        || path.split('/').any(|c| c == "..")
    {
        return Err(ConfigError::PathPrefix);
    }
    if !is_simple_name(&config.file_prefix) {
        return Err(ConfigError::FilePrefix);
    }
    Ok(())
}

/// Adds or replaces a configuration; a replaced one keeps its status (its schedule goes on).
pub fn put(
    configs: &mut BTreeMap<String, AutoSnapshot>,
    name: String,
    config: AutoSnapshotConfig,
) -> Result<(), ConfigError> {
    check(&name, &config)?;
    let same_files = |c: &AutoSnapshotConfig| {
        c.path_prefix.trim_end_matches('/') == config.path_prefix.trim_end_matches('/')
            && c.file_prefix == config.file_prefix
    };
    if let Some((other, _)) = configs.iter().find(|(n, e)| **n != name && same_files(&e.config)) {
        return Err(ConfigError::SameFiles(other.clone(), config.path_prefix.clone(), config.file_prefix.clone()));
    }
    if let Some(existing) = configs.get_mut(&name) {
        existing.config = config;
        return Ok(());
    }
    if configs.len() >= MAX_CONFIGS {
        return Err(ConfigError::TooMany);
    }
    configs.insert(name, AutoSnapshot { config, status: AutoSnapshotStatus::default() });
    Ok(())
}

/// Records a run. A configuration deleted meanwhile has nothing to record into.
pub fn record(configs: &mut BTreeMap<String, AutoSnapshot>, name: &str, mut status: AutoSnapshotStatus) {
    if let Some(entry) = configs.get_mut(name) {
        status.last_snapshot_error.truncate(floor_char_boundary(&status.last_snapshot_error, MAX_ERROR_BYTES));
        status.last_snapshot_url.truncate(floor_char_boundary(&status.last_snapshot_url, 2 * MAX_PATH_BYTES));
        entry.status = status;
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    (0..=max.min(s.len())).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0)
}

/// The configuration most overdue at `now`, if any is due.
pub fn most_overdue(configs: &BTreeMap<String, AutoSnapshot>, now: UnixMillis) -> Option<(&String, &AutoSnapshot)> {
    configs.iter().filter(|(_, c)| c.next_start() <= now).min_by_key(|(_, c)| c.next_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AutoSnapshotConfig {
        AutoSnapshotConfig {
            interval_secs: 60,
            retain: 3,
            path_prefix: "/var/backups/citadel".into(),
            file_prefix: "citadel-snapshot".into(),
        }
    }

    #[test]
    fn a_configuration_out_of_bounds_is_refused_naming_the_field() {
        assert_eq!(check("daily", &config()), Ok(()));
        assert_eq!(check("", &config()), Err(ConfigError::Name));
        assert_eq!(check("a/b", &config()), Err(ConfigError::Name));
        assert_eq!(check("daily", &AutoSnapshotConfig { interval_secs: 0, ..config() }), Err(ConfigError::Interval));
        assert_eq!(check("daily", &AutoSnapshotConfig { retain: 0, ..config() }), Err(ConfigError::Retain));
        for bad in ["relative/dir", "/a/../etc", "/x\0y"] {
            let c = AutoSnapshotConfig { path_prefix: bad.into(), ..config() };
            assert_eq!(check("daily", &c), Err(ConfigError::PathPrefix), "{bad:?}");
        }
        for bad in ["", "../x", "a b", ".hidden"] {
            let c = AutoSnapshotConfig { file_prefix: bad.into(), ..config() };
            assert_eq!(check("daily", &c), Err(ConfigError::FilePrefix), "{bad:?}");
        }
    }

    #[test]
    fn configurations_are_bounded_and_a_replaced_one_keeps_its_schedule() {
        let mut configs = BTreeMap::new();
        for i in 0..MAX_CONFIGS {
            put(&mut configs, format!("c{i}"), AutoSnapshotConfig { file_prefix: format!("c{i}"), ..config() })
                .unwrap();
        }
        assert_eq!(put(&mut configs, "one-more".into(), config()), Err(ConfigError::TooMany));
        record(&mut configs, "c0", AutoSnapshotStatus { last_snapshot_start: 5_000, ..Default::default() });
        put(&mut configs, "c0".into(), AutoSnapshotConfig { retain: 9, file_prefix: "c0".into(), ..config() }).unwrap();
        assert_eq!(configs["c0"].status.last_snapshot_start, 5_000);
        assert_eq!(configs["c0"].config.retain, 9);
        record(&mut configs, "gone", AutoSnapshotStatus::default());
        assert_eq!(configs.len(), MAX_CONFIGS, "recording a deleted configuration creates nothing");
    }

    #[test]
    fn two_configurations_whose_retention_would_delete_each_others_files_are_refused() {
        let mut configs = BTreeMap::new();
        put(&mut configs, "hourly".into(), config()).unwrap();
        let same = AutoSnapshotConfig { retain: 7, path_prefix: "/var/backups/citadel/".into(), ..config() };
        assert!(
            matches!(put(&mut configs, "daily".into(), same.clone()), Err(ConfigError::SameFiles(n, _, _)) if n == "hourly")
        );
        put(&mut configs, "daily".into(), AutoSnapshotConfig { file_prefix: "daily".into(), ..same }).unwrap();
        put(&mut configs, "hourly".into(), AutoSnapshotConfig { retain: 48, ..config() }).unwrap();
    }

    #[test]
    fn the_most_overdue_schedule_runs_first_and_a_new_one_at_once() {
        let mut configs = BTreeMap::new();
        put(
            &mut configs,
            "hourly".into(),
            AutoSnapshotConfig { interval_secs: 3600, file_prefix: "h".into(), ..config() },
        )
        .unwrap();
        put(&mut configs, "minutely".into(), config()).unwrap();
        record(&mut configs, "hourly", AutoSnapshotStatus { last_snapshot_start: 1_000, ..Default::default() });
        assert_eq!(most_overdue(&configs, 2_000).unwrap().0, "minutely", "never ran: due at once");
        record(&mut configs, "minutely", AutoSnapshotStatus { last_snapshot_start: 2_000, ..Default::default() });
        assert!(most_overdue(&configs, 61_999).is_none());
        assert_eq!(most_overdue(&configs, 62_000).unwrap().0, "minutely");
        record(&mut configs, "minutely", AutoSnapshotStatus { last_snapshot_start: 3_640_000, ..Default::default() });
        // Both due at 3,700,000: hourly since 3,601,000, minutely since 3,700,000.
        assert_eq!(most_overdue(&configs, 3_700_000).unwrap().0, "hourly", "the one due longest runs first");
    }

    #[test]
    fn a_long_error_is_cut_on_a_character_boundary() {
        let mut configs = BTreeMap::new();
        put(&mut configs, "c".into(), config()).unwrap();
        record(&mut configs, "c", AutoSnapshotStatus { last_snapshot_error: "é".repeat(1000), ..Default::default() });
        let kept = &configs["c"].status.last_snapshot_error;
        assert!(kept.len() <= MAX_ERROR_BYTES && kept.chars().all(|c| c == 'é'));
    }
}

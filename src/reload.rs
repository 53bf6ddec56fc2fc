//! Config reload: all or nothing. The new file is read and validated off the request path,
//! then swapped in with one store; a broken file changes nothing and is counted. The file
//! watcher reloads only a version of the file that two polls in a row saw unchanged, so a file
//! caught half-written is never loaded.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Config, ConfigErrors};
use crate::state::{ReloadRecord, State};

/// What a successful reload did.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub summary: String,
    /// Keys that changed but only take effect after a restart.
    pub restart_needed: Vec<&'static str>,
    /// False when the file had not changed.
    pub changed: bool,
}

/// Reloads the config file. `trigger` names what asked for it, for the log.
pub fn reload(state: &State, trigger: &str) -> Result<Reloaded, ConfigErrors> {
    // One at a time: a slower read of an older file must not be stored after a newer one.
    static RELOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = RELOADING.lock().unwrap_or_else(|e| e.into_inner());
    let result = Config::load(state.config_path());
    let m = state.metrics();
    let now = SystemTime::now();
    match result {
        Err(errors) => {
            m.config_reloads_total.with_label_values(&["failure"]).inc();
            tracing::error!(
                trigger,
                path = %state.config_path().display(),
                "config reload failed, the old config stays in force:\n{errors}"
            );
            state.record_reload(ReloadRecord {
                at: now,
                ok: false,
                error: Some(errors.to_string()),
            });
            Err(errors)
        }
        Ok(mut new) => {
            let old = state.config();
            let restart_needed = old.restart_needed(&new);
            // Keys that cannot change live keep their running values; the rest applies.
            new.keep_restart_only(&old);
            let changed = *old != new;
            if changed {
                state.install_config(new);
            }
            m.config_reloads_total.with_label_values(&["success"]).inc();
            m.config_last_reload_success_timestamp_seconds.set(
                now.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            );
            state.record_reload(ReloadRecord {
                at: now,
                ok: true,
                error: None,
            });
            let summary = state.config().summary();
            if !restart_needed.is_empty() {
                tracing::warn!(
                    trigger,
                    keys = ?restart_needed,
                    "config reloaded; these keys need a restart to take effect"
                );
            }
            tracing::info!(trigger, changed, "config reloaded: {summary}");
            Ok(Reloaded {
                summary,
                restart_needed,
                changed,
            })
        }
    }
}

/// What identifies one version of the config file: its metadata (modification time, size,
/// inode, device: a rename or a ConfigMap's symlink swap changes these) and its content's hash
/// (a writer may finish within the file system's timestamp granularity). `None` when it cannot
/// be read.
pub fn file_version(path: &std::path::Path) -> Option<FileVersion> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let content = std::fs::read(path).ok()?;
    Some(FileVersion {
        modified: m.modified().ok()?,
        len: m.len(),
        ino: m.ino(),
        dev: m.dev(),
        digest: crate::digest::sha256_hex(&content),
    })
}

/// One version of the config file, as [`file_version`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersion {
    modified: SystemTime,
    len: u64,
    ino: u64,
    dev: u64,
    digest: String,
}

/// The watcher's decision, poll by poll: reload when the file differs from the version last
/// loaded and the previous poll saw the same version. A writer still at work (an editor's
/// save, `cat > config.yaml`, a copy in two halves) changes the version between two polls, so
/// what it leaves half-written is never loaded; the whole file is, one poll after it is done.
/// Pure: the caller polls and stats.
#[derive(Debug, Clone)]
pub struct Settle<V> {
    loaded: Option<V>,
    seen: Option<V>,
}

impl<V: PartialEq + Clone> Settle<V> {
    /// `current`: the version in force at start.
    pub fn new(current: Option<V>) -> Settle<V> {
        Settle {
            loaded: current.clone(),
            seen: current,
        }
    }

    /// One poll saw `now` (`None`: the file could not be read). True: reload now.
    pub fn poll(&mut self, now: Option<V>) -> bool {
        let Some(now) = now else {
            // Gone or unreadable (mid-replacement): wait for it to settle again.
            self.seen = None;
            return false;
        };
        let settled = self.seen.as_ref() == Some(&now);
        self.seen = Some(now.clone());
        if settled && self.loaded.as_ref() != Some(&now) {
            self.loaded = Some(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reloaded_once_two_polls_agree() {
        let mut s = Settle::new(Some(1));
        assert!(!s.poll(Some(1)), "unchanged");
        assert!(!s.poll(Some(2)), "changed, not yet settled");
        assert!(!s.poll(Some(3)), "still changing");
        assert!(s.poll(Some(3)), "settled: reload");
        assert!(!s.poll(Some(3)), "loaded already");
        assert!(!s.poll(None), "unreadable");
        assert!(!s.poll(Some(3)), "back as it was loaded");
        assert!(!s.poll(Some(1)));
        assert!(s.poll(Some(1)), "back to an older version is a change too");
    }

    #[test]
    fn a_file_written_in_two_halves_is_read_only_when_whole() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "listen: \"127.0.0.1:1\"\n").unwrap();
        let mut s = Settle::new(file_version(&path));
        // The first half lands between two polls...
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"upstreams:\n  api: { url: \"http://").unwrap();
        f.flush().unwrap();
        assert!(!s.poll(file_version(&path)), "half a file is not loaded");
        // ...the second half before the next one.
        f.write_all(b"127.0.0.1:2\" }\n").unwrap();
        f.flush().unwrap();
        assert!(
            !s.poll(file_version(&path)),
            "changed again since the last poll"
        );
        let whole = file_version(&path);
        assert!(s.poll(whole), "two polls agree: the whole file is loaded");
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("2\" }\n"));
    }
}

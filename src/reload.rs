//! Config reload: all or nothing. The new file is read and validated off the request path,
//! then swapped in with one store; a broken file changes nothing and is counted.

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

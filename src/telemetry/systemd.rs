//! systemd notifications (sd_notify): READY, RELOADING, STOPPING, WATCHDOG.
//! All are no-ops when NOTIFY_SOCKET is unset. WATCHDOG=1 is sent only from
//! the reconciler's own loop, so a stuck loop stops the pings.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("registry in sync")]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog (half its timeout), if systemd asked for it.
pub fn watchdog_every() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

//! Crash points: named places in the daemon's state changes where a test can make the process
//! die as a `kill -9` would, to show that every step of Prepare, Commit, Remove and a lazy
//! mount survives a crash right there (issue 15).
//!
//! `BEAM_CRASH_AT=NAME` in the daemon's environment makes it send itself SIGKILL when it
//! reaches the point `NAME`. The variable is read once per process; without it a point costs
//! one comparison. It is in every build (the tests may run a release binary), and it gives
//! nothing to anyone who could not already kill the daemon: only whoever starts the daemon
//! sets its environment.

/// Die here with SIGKILL if `BEAM_CRASH_AT` names this point.
#[inline]
pub fn point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("BEAM_CRASH_AT").ok());
    if at.as_deref() == Some(name) {
        tracing::warn!(point = name, "crash point reached: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

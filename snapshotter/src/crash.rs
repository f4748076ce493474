//! Crash points: named places in the daemon's state changes where a test can make the process
//! die as a `kill -9` would, to show that every step of Prepare, Commit, Remove and a lazy
//! mount survives a crash right there (issue 15).
//!
//! In debug builds (the ones the tests run), `BEAM_CRASH_AT=NAME` makes the process send
//! itself SIGKILL when it reaches the point `NAME`. Release builds compile every point to
//! nothing: a node's daemon cannot be told to crash.

/// Die here with SIGKILL if `BEAM_CRASH_AT` names this point (debug builds only).
#[inline]
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let at = AT.get_or_init(|| std::env::var("BEAM_CRASH_AT").ok());
        if at.as_deref() == Some(name) {
            tracing::warn!(point = name, "crash point reached: SIGKILL");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

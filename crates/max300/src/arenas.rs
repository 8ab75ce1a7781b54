//! glibc's allocator gives each new thread an arena of its own, up to eight a core. A service
//! runs a dozen threads (the runtime's workers and its blocking pool: SQLite, file I/O, the
//! normalizer), and each arena keeps what its threads freed: at an ingestion of 10,000 units
//! that was about 5 MB of its 36 MB peak. One arena a core is as many as can be in use at
//! once. glibc reads its limit only from the environment at start-up, and setting it from
//! inside takes unsafe code, which this workspace forbids: so the program starts itself
//! again, once, with the limit in its environment.

/// The variable glibc reads.
const ARENA_MAX: &str = "MALLOC_ARENA_MAX";

/// Replaces this process with itself (same pid, arguments and descriptors) with
/// `MALLOC_ARENA_MAX` set to the number of cores, unless the environment already sets it or
/// any glibc tunable: an operator's choice stands. Returns only when it does not replace it,
/// or cannot (then glibc's default holds, as it always did).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn one_per_core() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(ARENA_MAX).is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    // `exec` returns only if it failed.
    let _failed = command.args(args).env(ARENA_MAX, cores.to_string()).exec();
}

/// Other platforms' allocators have no such arenas.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn one_per_core() {}

//! glibc's allocator, set for a service that holds little for long and passes a lot through.
//!
//! - **Arenas.** glibc gives each new thread an arena of its own, up to eight a core. A
//!   service runs a dozen threads (the runtime's workers and its blocking pool: SQLite, file
//!   I/O, the normalizer), and each arena keeps what its threads freed: at an ingestion of
//!   10,000 units that was about 5 MB of its 36 MB peak. One arena a core is as many as can be
//!   in use at once.
//! - **The mmap threshold.** A block of at least the threshold is mapped on its own and given
//!   back to the kernel when freed. glibc raises the threshold each time such a block is
//!   freed (up to 32 MiB), after which the same large blocks (a map of every command's first
//!   publish, a batch's buffers) come from the heap and stay there as free holes: at an
//!   ingestion of 100,000 units about 2 MB of its peak. A fixed 1 MiB keeps them mapped; the
//!   many smaller blocks are unchanged, and so was the ingestion's speed.
//!
//! glibc reads both only from the environment at start-up, and setting them from inside
//! takes unsafe code, which this workspace forbids: so the program starts itself again, once,
//! with them in its environment.

/// The variables glibc reads, and what this program sets them to (`None`: the cores).
const SETTINGS: [(&str, Option<&str>); 2] = [
    ("MALLOC_ARENA_MAX", None),
    ("MALLOC_MMAP_THRESHOLD_", Some("1048576")),
];

/// Replaces this process with itself (same pid, arguments and descriptors) with
/// [`SETTINGS`] in its environment, unless the environment already sets any of them or any
/// glibc tunable: an operator's choice of the allocator's settings stands, whole. Returns only
/// when it does not replace it, or cannot (then glibc's defaults hold, as they always did).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tuned() {
    use std::os::unix::process::CommandExt;
    let set = |name: &str| std::env::var_os(name).is_some();
    if set("GLIBC_TUNABLES") || SETTINGS.iter().any(|(name, _)| set(name)) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    for (name, value) in SETTINGS {
        command.env(name, value.unwrap_or(&cores));
    }
    // `exec` returns only if it failed.
    let _failed = command.args(args).exec();
}

/// Other platforms' allocators have no such settings.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tuned() {}

//! Giving freed heap memory back to the operating system.
//!
//! A reload of 100,000 domains frees a whole snapshot and the parse's
//! temporaries on a blocking thread. glibc's malloc keeps such memory in its
//! per-thread arenas (only the top of the main heap is returned by itself),
//! so without help the resident size grows with each reload until it
//! plateaus at several times the live size. `malloc_trim(0)` returns the
//! free pages of every arena.

/// Returns free heap pages to the OS where the allocator keeps them
/// (glibc); a no-op elsewhere. Takes a few milliseconds on a large heap:
/// call it from a blocking thread, after memory was freed.
pub fn release_free_memory() {
    let before = rss_bytes();
    trim();
    if let (Some(before), Some(after)) = (before, rss_bytes()) {
        tracing::debug!(
            rss_before_mb = before / (1 << 20),
            rss_after_mb = after / (1 << 20),
            "returned free memory to the OS"
        );
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim only walks and releases glibc's own free lists;
    // it takes no pointer and is thread-safe (each arena is locked).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Resident set size of this process (Linux), for the log.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

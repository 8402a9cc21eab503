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

/// A trim is waiting in the background (see [`release_free_memory_soon`]).
static TRIM_PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// [`release_free_memory`] a moment from now, in the background, at most
/// one waiting at a time: after small reloads, whose latency should not
/// include a walk of a million domains' heap, while what they freed still
/// goes back to the OS. Needs a Tokio runtime.
pub fn release_free_memory_soon() {
    use std::sync::atomic::Ordering;
    if TRIM_PENDING.swap(true, Ordering::SeqCst) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        TRIM_PENDING.store(false, Ordering::SeqCst);
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
    });
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

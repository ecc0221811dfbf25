//! CPU work whose cost grows with what a caller sends (parsing a large
//! request or SPC) runs off the async workers: under a 1-CPU limit the
//! runtime may have one worker, and a parse running on it would stall every
//! other Mount and `/healthz`. Small inputs, the common case, stay inline:
//! a thread hand-off costs more than parsing a few KB. Large ones run on the
//! blocking pool one at a time; every such job is bounded (see `yaml`), so
//! a Mount's deadline or shutdown never waits long on one.

use tokio::sync::Semaphore;

/// Inputs up to this size are handled inline.
pub const INLINE_BYTES: usize = 64 * 1024;

/// One heavy job at a time: a flood of large requests queues here instead
/// of occupying every core.
static HEAVY: Semaphore = Semaphore::const_new(1);

/// How long a large request waits for its turn before it is turned away
/// (Unavailable: the driver retries) rather than wait out its deadline.
pub const MAX_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("the node is busy parsing other large requests; try again")]
    Busy,
    #[error("internal error: a parsing task failed")]
    Failed,
}

/// Runs `job`, which does work proportional to `input_bytes`, inline or on
/// the blocking pool.
pub async fn run<T, F>(input_bytes: usize, job: F) -> Result<T, WorkError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if input_bytes <= INLINE_BYTES {
        return Ok(job());
    }
    let _permit = tokio::time::timeout(MAX_QUEUE_WAIT, HEAVY.acquire())
        .await
        .map_err(|_| WorkError::Busy)?
        .map_err(|_| WorkError::Failed)?;
    tokio::task::spawn_blocking(move || {
        let out = job();
        // A large parse leaves megabytes of freed memory behind; give it
        // back rather than let a one-off request raise the RSS for good.
        release_memory();
        out
    })
    .await
    .map_err(|_| WorkError::Failed)
}

/// Jobs whose cost is bounded by a budget rather than by their input
/// (templates under fuel) that may run at once: one, so a burst of costly
/// ones holds one blocking thread and one job's memory while the async
/// workers serve (a legitimate render takes tens of microseconds).
static BOUNDED: Semaphore = Semaphore::const_new(1);

/// Runs `job`, whose cost is bounded (milliseconds at worst) but may be
/// that high for a tiny input, on the blocking pool: a hostile job never
/// stalls an async worker. Unlike [`run`], no heap trim afterwards: these
/// jobs are frequent and small.
pub async fn run_bounded<T, F>(job: F) -> Result<T, WorkError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let _permit = tokio::time::timeout(MAX_QUEUE_WAIT, BOUNDED.acquire())
        .await
        .map_err(|_| WorkError::Busy)?
        .map_err(|_| WorkError::Failed)?;
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|_| WorkError::Failed)
}

/// Caps glibc's malloc arenas. The daemon's own heap is mimalloc's (see
/// `main`), but the C crypto library (aws-lc, under TLS) allocates through
/// glibc: by default glibc makes up to 8 arenas per core, and every thread
/// keeps its own arena's high-water mark (measured before mimalloc: RSS
/// past 120 MiB under a stream of large SPCs with the default, 66 MiB with
/// one arena). Call before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Unmaps the daemon's own code and read-only data pages (the
/// executable's mappings that were never written: text and constants, not
/// data or the relocated read-only part), so that what stays resident is
/// what runs from now on. The binary carries four cloud SDKs and the kernel
/// maps file pages 64 KiB around every fault: start-up code, its constants
/// and their neighbours otherwise stay in RSS for good. The page cache
/// keeps the file, so a page used again comes back with a minor fault.
pub fn drop_code_pages() {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
            return;
        };
        // smaps, not maps: it tells which mappings hold written (private,
        // anonymous) pages, and those must stay.
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        for (start, end) in never_written(&smaps, &exe.to_string_lossy()) {
            // SAFETY: a private, read-only file mapping of our own
            // executable with no written page: MADV_DONTNEED only drops
            // page-table entries, and the next access maps the same file
            // contents again.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

/// The address ranges in `smaps` of `exe`'s read-only mappings (`r-xp`,
/// `r--p`) that have no anonymous page: never written, so their pages are
/// exactly the file's. A relocated read-only part (RELRO) was written
/// before it was made read-only and is left out.
fn never_written(smaps: &str, exe: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    // The mapping being read, while its fields follow.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some(anonymous) = line.strip_prefix("Anonymous:") {
            let written = anonymous.split_whitespace().next() != Some("0");
            if let Some(range) = current.take().filter(|_| !written) {
                ranges.push(range);
            }
            continue;
        }
        // A field line ("Rss:", "VmFlags:") or a mapping's first line.
        let Some((start, end)) = first.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let perms = fields.next();
        current = (matches!(perms, Some("r-xp" | "r--p")) && fields.nth(3) == Some(exe))
            .then_some((start, end));
    }
    ranges
}

/// Returns freed heap memory to the system: mimalloc's (the daemon's
/// allocator; a no-op where it is not the global allocator) and glibc's.
pub fn release_memory() {
    // SAFETY: mi_collect only returns free memory; it may run on any thread.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn large_jobs_leave_the_runtime_free() {
        let main = std::thread::current().id();
        let small = run(10, move || std::thread::current().id()).await.unwrap();
        assert_eq!(small, main, "small inputs run inline");
        let big = run(INLINE_BYTES + 1, move || std::thread::current().id())
            .await
            .unwrap();
        assert_ne!(big, main, "large inputs run elsewhere");
    }

    const SMAPS: &str = "\
55d000000000-55d000100000 r--p 00000000 fe:01 42 /opt/coffer
Rss:                 400 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
55d000100000-55d001000000 r-xp 00100000 fe:01 42 /opt/coffer
Rss:                7000 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
55d001000000-55d001100000 r--p 01000000 fe:01 42 /opt/coffer
Rss:                 600 kB
Anonymous:           592 kB
VmFlags: rd mr mw me ac
55d001100000-55d001140000 rw-p 01100000 fe:01 42 /opt/coffer
Anonymous:           160 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:01 7 /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 r--p 00000000 fe:01 43 /opt/coffer-other
Anonymous:             0 kB
";

    #[test]
    fn only_never_written_read_only_mappings_of_the_executable_are_dropped() {
        assert_eq!(
            never_written(SMAPS, "/opt/coffer"),
            vec![
                (0x55d0_0000_0000, 0x55d0_0010_0000),
                (0x55d0_0010_0000, 0x55d0_0100_0000)
            ],
            "text and constants; not the relocated part, data, libc or another file"
        );
        assert!(never_written("garbage\n-\nAnonymous: x", "/opt/coffer").is_empty());
    }

    #[test]
    fn the_process_runs_on_after_its_pages_are_dropped() {
        drop_code_pages();
        // Code, constants, relocated vtables and formatting all still work.
        let shown: Vec<Box<dyn std::fmt::Display>> = vec![Box::new(1.5f64), Box::new("text")];
        let text = shown.iter().map(|d| format!("{d:>6}")).collect::<String>();
        assert_eq!(text, "   1.5  text");
    }
}

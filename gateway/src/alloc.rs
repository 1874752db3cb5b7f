//! Giving freed memory back to the OS. mimalloc (the binary's allocator) keeps the pages
//! a thread freed until that thread allocates again, and purges them only then: a
//! serving thread that goes idle after a burst (a huge answer, a thousand connections)
//! would keep its high-water mark for as long as it stays idle. Each runtime calls
//! [`purge`] on a slow tick; measured in docs/performance.md.

use std::time::Duration;

/// How often an idle-or-not thread gives its freed pages back.
pub const PURGE_EVERY: Duration = Duration::from_secs(5);

/// Returns the calling thread's freed pages (and abandoned ones) to the OS.
pub fn purge() {
    // SAFETY: mi_collect takes a flag and touches only mimalloc's own state; it is
    // documented as safe to call at any time from any thread. Without mimalloc as the
    // global allocator (tests, fuzzing) its heaps are empty and it does nothing.
    #[expect(
        unsafe_code,
        reason = "one FFI call without pointers or invariants to uphold"
    )]
    unsafe {
        libmimalloc_sys::mi_collect(true)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_is_callable_from_any_thread() {
        super::purge();
        std::thread::spawn(super::purge).join().unwrap();
    }
}

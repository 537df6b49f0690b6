//! What the fuzz tests share (issue 13; figures in `docs/RELIABILITY.md`): the case count, and a global allocator
//! that records the largest single allocation a thread makes, so a test can assert that a decoder never allocates
//! from a length it has not checked. Included by the proto, node and coordinator fuzz tests.
#![allow(dead_code)] // each test binary uses its own part

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::test_runner::Config;

/// Cases per property in the normal test run; `SHARDLINE_FUZZ_CASES` raises it for the long runs.
pub const DEFAULT_CASES: u32 = 100_000;

/// The proptest configuration of every fuzz property: [`DEFAULT_CASES`] (or `SHARDLINE_FUZZ_CASES`) cases, no
/// regression files written into the source tree (a failure prints its minimal input).
pub fn config() -> Config {
    let cases = std::env::var("SHARDLINE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// The system allocator, recording per thread the largest allocation since [`largest_allocation`] began.
pub struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    // `try_with`: allocations during thread teardown are not recorded.
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; recording touches only a
// const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` has too.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation (bytes) this thread made meanwhile.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    PEAK.with(|p| p.set(0));
    let r = f();
    (r, PEAK.with(|p| p.get()))
}

/// Applies byte edits to `bytes`: each `(index, xor)` flips bits of the byte at `index % len`; then keeps the first
/// `keep` bytes when `keep` is shorter. The mutation model of the fuzz properties: bit flips and truncation.
pub fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], keep: Option<usize>) -> Vec<u8> {
    if !bytes.is_empty() {
        let len = bytes.len();
        for &(i, x) in flips {
            bytes[i % len] ^= x;
        }
    }
    if let Some(k) = keep {
        bytes.truncate(k);
    }
    bytes
}

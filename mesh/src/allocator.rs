//! The global allocator of the krun and hgate binaries: mimalloc, with its arenas committed
//! as they are used.
//!
//! mimalloc instead of glibc's malloc: the tunnel data path allocates and frees buffers of
//! 16 KiB to 1 MiB per TLS record and HTTP/2 frame; glibc returns such blocks to the kernel
//! (`madvise`, `munmap`) and faults them in again on the next read, which measured as hundreds
//! of thousands of page faults per GB on the HBONE server. mimalloc keeps them in per-thread
//! heaps (ztunnel links jemalloc for the same reason).
//!
//! mimalloc's defaults commit a whole arena at once and let the kernel back it with
//! transparent huge pages, so an idle krun held ~8 MiB more anonymous memory than with glibc.
//! `MIMALLOC_ARENA_EAGER_COMMIT=0` in the environment removes that, but the environment is
//! inherited by the app krun runs. Setting the option at the start of `main` is too late
//! (measured: Rust's runtime allocates before `main`, which reserves the first arena), so
//! [`Allocator`] sets it on the process's first allocation, before mimalloc reserves anything.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

use libmimalloc_sys::{mi_option_set, mi_option_t};
use mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc.h (`enum mi_option_e`, v2 and v3); the crate
/// names no constant for it.
const ARENA_EAGER_COMMIT: mi_option_t = 4;

/// `mi_option_allow_large_os_pages` in mimalloc.h (`enum mi_option_e`); large pages imply
/// eager commit.
const ALLOW_LARGE_OS_PAGES: mi_option_t = 6;

/// Whether [`commit_lazily`] has run; checked on every allocation (one relaxed load).
static TUNED: AtomicBool = AtomicBool::new(false);

/// mimalloc, tuned on first use: declare it as the binary's `#[global_allocator]`.
pub struct Allocator;

/// Makes mimalloc commit arena memory as it is used instead of whole arenas backed by huge
/// pages. Idempotent; a race of two first allocations sets the same values twice.
fn commit_lazily() {
    if !TUNED.load(Ordering::Relaxed) {
        // SAFETY: mi_option_set stores an integer in mimalloc's option table; it does not
        // allocate and is valid at any time in the process's life.
        unsafe {
            mi_option_set(ARENA_EAGER_COMMIT, 0);
            mi_option_set(ALLOW_LARGE_OS_PAGES, 0);
        }
        TUNED.store(true, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to MiMalloc, which upholds GlobalAlloc's contract;
// commit_lazily only sets options before the first allocation.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        commit_lazily();
        // SAFETY: the caller's contract is forwarded unchanged.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        commit_lazily();
        // SAFETY: the caller's contract is forwarded unchanged.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is forwarded unchanged.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is forwarded unchanged; ptr came from alloc, so the
        // options are already set.
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

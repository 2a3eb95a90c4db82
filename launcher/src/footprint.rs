//! Hands the pages of krun's startup code back once the app has been ready for a moment.
//!
//! Starting runs code that never runs again: the settings table, discovery, identity, the
//! data plane's set-up, each in a different part of a 20 MB executable. The kernel maps an
//! executable's text in windows (64 KiB of fault-around, or a whole large folio) around every
//! page that runs, so by the time the app is ready ~9 MiB of krun's own text is resident,
//! while what runs from then on (signals, reaping, the tunnels) needs a fraction of it.
//!
//! [`release_startup_pages`] unmaps the executable's read-only segments (headers, read-only
//! data, text) with `MADV_DONTNEED`. Their copies in the page cache are untouched and clean:
//! code that runs again maps its page back with a minor fault, and the kernel can reclaim the
//! rest without first unmapping it, as it would for any file it cached. The writable segment
//! (data, and the relocated `.data.rel.ro` inside it) holds private copies that
//! `MADV_DONTNEED` would discard, so it is left alone.
//!
//! The same goes for the shared libraries of a dynamically linked build (libc, libm,
//! libgcc_s): their read-only pages are shared by every process, and krun's idle loop needs few.
//!
//! The segments come from the loaded objects' program headers (`dl_iterate_phdr`), which costs
//! microseconds; `/proc/self/smaps` would say which pages are resident but takes ~0.3 ms to
//! read.

use std::io;
use std::ops::Range;
use std::time::Duration;

use nix::libc;
use tokio::sync::watch;

use crate::supervisor::Phase;

/// How long after the app is ready krun releases its startup pages: the work that follows
/// readiness at once (its log lines, the tunnel opening, the first requests) would otherwise
/// map much of them straight back, and a `krun -- true` that is already gone never pays for it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Waits until the app has been ready for [`SETTLE`], then releases krun's startup pages and
/// logs how much it unmapped.
pub async fn release_when_settled(mut phase: watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::Ready).await.is_err() {
        return;
    }
    tokio::time::sleep(SETTLE).await;
    if *phase.borrow() != Phase::Ready {
        return;
    }
    match release_startup_pages() {
        Ok(bytes) => tracing::info!(
            unmapped_kib = bytes >> 10,
            "startup code unmapped from krun's memory; the page cache keeps it"
        ),
        Err(e) => tracing::debug!(error = %e, "startup code left mapped"),
    }
}

#[cfg(target_pointer_width = "64")]
type ProgramHeader = libc::Elf64_Phdr;
#[cfg(target_pointer_width = "32")]
type ProgramHeader = libc::Elf32_Phdr;

/// Unmaps the pages of krun's executable and loaded libraries that were never written (their
/// read-only segments); returns how many bytes of address space that covered.
pub fn release_startup_pages() -> io::Result<usize> {
    let page = page_size()?;
    let mut released = 0;
    for range in loaded_read_only_pages(page) {
        // SAFETY: the range is whole pages of a read-only segment of an object loaded into
        // the process (never unloaded: krun does not dlclose), which nothing in the process
        // writes to, so dropping their page table entries loses nothing: each page reads back
        // from the file on its next access. No Rust object lives in it.
        let result = unsafe {
            libc::madvise(
                range.start as *mut libc::c_void,
                range.len(),
                libc::MADV_DONTNEED,
            )
        };
        // The kernel's own mappings (the vDSO) refuse; everything else is a file's pages.
        if result == 0 {
            released += range.len();
        }
    }
    if released == 0 {
        return Err(io::Error::other("no read-only segment could be unmapped"));
    }
    Ok(released)
}

/// The read-only pages of every object loaded into the process: the executable and, in a
/// dynamically linked build, the C library and its companions. Shared libraries count too:
/// their pages are in every process's page cache anyway, and krun's idle loop needs few of
/// them.
fn loaded_read_only_pages(page: usize) -> Vec<Range<usize>> {
    struct Collect {
        page: usize,
        ranges: Vec<Range<usize>>,
    }
    unsafe extern "C" fn each_object(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid `info` for the duration of the call, and
        // `data` is the `Collect` handed to it below, borrowed by nothing else meanwhile.
        let (info, collect) = unsafe { (&*info, &mut *data.cast::<Collect>()) };
        if !info.dlpi_phdr.is_null() {
            // SAFETY: dlpi_phdr points at the object's dlpi_phnum program headers, mapped
            // read-only for as long as the object is loaded.
            let headers =
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
            let bias = info.dlpi_addr as usize;
            collect
                .ranges
                .extend(read_only_pages(headers, bias, collect.page));
        }
        0
    }
    let mut collect = Collect {
        page,
        ranges: Vec::new(),
    };
    // SAFETY: the callback only reads what dl_iterate_phdr passes it and appends to `collect`,
    // which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(each_object), (&raw mut collect).cast());
    }
    collect.ranges
}

fn page_size() -> io::Result<usize> {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .map_err(io::Error::from)?
        .and_then(|size| usize::try_from(size).ok())
        .ok_or_else(|| io::Error::other("no page size"))
}

/// The whole pages of each loaded segment that is not writable. A page the segment shares
/// with a neighbour is left out, so no writable byte is ever in a released range.
fn read_only_pages(
    headers: &[ProgramHeader],
    load_bias: usize,
    page: usize,
) -> impl Iterator<Item = Range<usize>> + '_ {
    headers
        .iter()
        .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0)
        .filter_map(move |h| {
            let start = load_bias.checked_add(h.p_vaddr as usize)?;
            let end = start.checked_add(h.p_memsz as usize)?;
            let start = start.checked_next_multiple_of(page)?;
            let end = end - end % page;
            (start < end).then_some(start..end)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(p_type: u32, p_flags: u32, p_vaddr: usize, p_memsz: usize) -> ProgramHeader {
        // SAFETY: ProgramHeader is a plain C struct of integers, for which all zeroes is valid.
        let mut h: ProgramHeader = unsafe { std::mem::zeroed() };
        h.p_type = p_type;
        h.p_flags = p_flags;
        h.p_vaddr = p_vaddr as _;
        h.p_memsz = p_memsz as _;
        h
    }

    #[test]
    fn only_whole_pages_of_loaded_read_only_segments_are_released() {
        const R: u32 = libc::PF_R;
        const RX: u32 = libc::PF_R | libc::PF_X;
        const RW: u32 = libc::PF_R | libc::PF_W;
        // The layout of krun's executable: headers and read-only data, text, then data whose
        // first part (the relocated .data.rel.ro) is read-only once the loader is done.
        let headers = [
            header(libc::PT_PHDR, R, 0x40, 0x2d8),
            header(libc::PT_LOAD, R, 0, 0x38a594),
            header(libc::PT_LOAD, RX, 0x38b5c0, 0xe772a0),
            header(libc::PT_LOAD, RW, 0x1203860, 0xa17a0),
            header(libc::PT_GNU_RELRO, R, 0x1203860, 0xa0da8),
        ];
        let bias = 0x55dc_aab5_6000;
        let ranges: Vec<_> = read_only_pages(&headers, bias, 0x1000).collect();
        assert_eq!(
            ranges,
            vec![
                // The last, partly filled page of each segment stays mapped.
                bias..bias + 0x38a000,
                bias + 0x38c000..bias + 0x1202000,
            ]
        );
    }

    #[test]
    fn a_segment_within_one_page_releases_nothing() {
        let headers = [header(libc::PT_LOAD, libc::PF_R, 0x1010, 0x100)];
        assert_eq!(read_only_pages(&headers, 0, 0x1000).count(), 0);
    }

    #[test]
    fn releasing_unmaps_resident_text_of_this_test_binary() {
        let resident_text_kib = || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            let exe = std::fs::read_link("/proc/self/exe").expect("exe");
            let exe = exe.to_string_lossy();
            let mut in_text = false;
            let mut kib = 0u64;
            for line in smaps.lines() {
                // A mapping's header starts with its address range, `start-end` in hex.
                let range = line.split_whitespace().next().unwrap_or("");
                if range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                    in_text = line.contains(" r-xp ") && line.ends_with(&*exe);
                } else if in_text && let Some(rss) = line.strip_prefix("Rss:") {
                    kib += rss
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .expect("kB");
                }
            }
            kib
        };
        let before = resident_text_kib();
        assert!(before > 0, "the test binary's text is resident");
        let released = release_startup_pages().expect("release");
        assert!(released > 0, "read-only segments were found");
        // Reading smaps again runs some code, which maps its pages back: fewer than before.
        assert!(resident_text_kib() < before, "text pages were unmapped");
    }
}

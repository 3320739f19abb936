//! The SIGBUS side of the read mapping (see mapping.rs, "Why a signal handler"): the table of
//! registered mappings the handler consults, its installation, and the handler itself. Nothing
//! here runs on the read path except through a fault.

#![allow(unsafe_code)]

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings that may exist at once; one more falls back to `pread`.
const MAX_REGIONS: usize = 64;

/// One registered mapping, `[start, end)`; both 0 when the slot is free.
pub(super) struct Region {
    pub(super) start: AtomicUsize,
    pub(super) end: AtomicUsize,
    /// Set by the handler when a page of the mapping could not be read: from then on every read
    /// of it goes to `pread`.
    pub(super) broken: AtomicBool,
}

pub(super) static REGIONS: [Region; MAX_REGIONS] = [const {
    Region {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        broken: AtomicBool::new(false),
    }
}; MAX_REGIONS];

/// The host's page size, set before the handler is installed.
pub(super) static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action in place before ours, to hand other faults to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Whether our handler is installed.
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Registers the mapping `[start, end)`; its slot, or `None` when all are taken.
pub(super) fn register(start: usize, end: usize) -> Option<usize> {
    for (i, r) in REGIONS.iter().enumerate() {
        if r.start
            .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            r.end.store(end, Ordering::SeqCst);
            return Some(i);
        }
    }
    None
}

/// The registered mapping holding `addr`.
fn region_of(addr: usize) -> Option<&'static Region> {
    REGIONS.iter().find(|r| {
        let s = r.start.load(Ordering::SeqCst);
        s != 0 && addr >= s && addr < r.end.load(Ordering::SeqCst)
    })
}

/// Installs `on_sigbus` once per process; whether it is in place.
pub(super) fn install_handler() -> bool {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty mask, no flags).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: only reads the current action into `old`, a valid out-pointer.
        if unsafe { libc::sigaction(libc::SIGBUS, ptr::null(), &mut old) } != 0 {
            let _ = INSTALLED.set(false);
            return;
        }
        // The handler may run as soon as it is installed, so what it hands on to is set first.
        let _ = PREVIOUS.set(old);
        // SAFETY: as above.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `new` is fully initialized and `on_sigbus` has the SA_SIGINFO signature. It
        // only does async-signal-safe things: atomics and the mmap/sigaction system calls.
        let ok = unsafe { libc::sigaction(libc::SIGBUS, &new, ptr::null_mut()) } == 0;
        let _ = INSTALLED.set(ok);
    });
    INSTALLED.get().copied().unwrap_or(false)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid siginfo; for SIGBUS raised by a
    // memory access it holds the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some(region) = region_of(addr) {
        // Marked before the zero page goes in, so a reader that copies zeros sees the mark.
        region.broken.store(true, Ordering::SeqCst);
        let page = addr & !(PAGE_SIZE.load(Ordering::Relaxed) - 1);
        // SAFETY: the page lies inside one of our registered mappings, which only this module
        // reads and only through `ReadMapping::read`; MAP_FIXED replaces exactly that page by a
        // private page of zeros, so the faulting copy can finish.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE_SIZE.load(Ordering::Relaxed),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return;
        }
    }
    hand_on(sig, info, ctx);
}

/// Passes a fault that is not ours (or that we cannot absorb) to the previous action.
fn hand_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get().copied();
    match prev {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous action was installed with SA_SIGINFO, so its handler has
                // this signature; we call it with the arguments the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO a handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Default action: put it back and return; the access faults again and the process
            // ends as it would have without this module.
            // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: `dfl` is a valid action; sigaction is async-signal-safe.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, ptr::null_mut()) };
        }
    }
}

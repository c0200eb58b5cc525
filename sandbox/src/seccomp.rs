use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use seccompiler::{sock_filter, BpfProgram};
use thiserror::Error;

use crate::syscall_names::NAMES;

/// The exit status of a process a forbidden call ended (128 + SIGSYS).
pub const FORBIDDEN_EXIT: i32 = 128 + libc::SIGSYS;

/// What every thread of a Rust program like ours does: allocate, lock,
/// log, take a signal, sleep, start and end.
pub const EVERY_THREAD: &[&str] = &[
    "brk",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "exit",
    "exit_group",
    "futex",
    "getpid",
    "getrandom",
    "gettid",
    "madvise",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "prctl",
    "restart_syscall",
    "rseq",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "set_robust_list",
    "sigaltstack",
    "write",
    "writev",
];

/// An event loop's calls (epoll on eventfds).
pub const EVENT_LOOP: &[&str] = &[
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "read",
];

/// Whether threads confine themselves (a `--no-seccomp` leaves it off).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns filtering on for every thread confined from now on, with the
/// SIGSYS reporter in place.
pub fn enable(program: &'static str) -> Result<(), SandboxError> {
    install_reporter(program)?;
    // glibc's malloc sizes its arena limit from the number of CPUs, which
    // it reads from /sys (openat) the first time many threads allocate at
    // once: a thread under a filter without openat would trap on it. The
    // limit is set now, to glibc's own default (8 per CPU), so it never
    // looks.
    if !ARENAS_SET.load(Ordering::SeqCst) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        malloc_arenas(8 * cpus);
    }
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether the process chose its number of malloc arenas.
static ARENAS_SET: AtomicBool = AtomicBool::new(false);

/// At most `n` malloc arenas: glibc otherwise gives each thread that
/// allocates an arena of its own (a 64 MiB reservation trimmed by two
/// more calls, and pages touched) as long as fewer than 8 per CPU exist.
/// Call it before starting threads.
pub fn malloc_arenas(n: usize) {
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n.clamp(1, i32::MAX as usize) as i32) };
    ARENAS_SET.store(true, Ordering::SeqCst);
}

/// Names `policy` as the calling thread's for the report: a thread that
/// inherited its filter from the thread that started it (no filter of its
/// own to compile and install).
pub fn inherited(policy: &Policy) {
    THREAD_POLICY.with(|p| p.set(policy.name));
}

/// Confines the calling thread to `policy` when filtering is on.
pub fn confine(policy: &Policy) -> Result<(), SandboxError> {
    if ENABLED.load(Ordering::SeqCst) {
        policy.apply()
    } else {
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("seccomp policy {policy:?}: unknown system call {name:?}")]
    UnknownSyscall {
        policy: &'static str,
        name: &'static str,
    },
    #[error("seccomp policy {policy:?}: too many separate ranges of system calls for one filter")]
    TooLarge { policy: &'static str },
    #[error("seccomp policy {policy:?}: installing its filter")]
    Apply {
        policy: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS reporter")]
    Reporter(#[source] std::io::Error),
}

/// The system calls one kind of thread may make, by name.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The thread kind, as the report names it ("vcpu", "queue worker").
    pub name: &'static str,
    /// Calls of this kind of thread, besides [`EVERY_THREAD`]'s, in
    /// groups (a group several kinds share, such as file I/O).
    pub groups: &'static [&'static [&'static str]],
}

/// The number of the system call `name` on this architecture.
pub fn syscall_number(name: &str) -> Option<i64> {
    NAMES
        .iter()
        .position(|n| !n.is_empty() && *n == name)
        .map(|nr| nr as i64)
}

/// The name of system call number `nr`.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    usize::try_from(nr)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
}

thread_local! {
    /// The policy this thread runs under, for the report.
    static THREAD_POLICY: Cell<&'static str> = const { Cell::new("unconfined") };
}

/// The program name the report starts with (set once by the reporter).
static PROGRAM: AtomicPtr<&'static str> = AtomicPtr::new(std::ptr::null_mut());

impl Policy {
    /// The compiled filter: the policy's calls allowed, anything else traps.
    pub fn compile(&self) -> Result<BpfProgram, SandboxError> {
        let mut numbers = Vec::new();
        for &name in EVERY_THREAD
            .iter()
            .chain(self.groups.iter().copied().flatten())
        {
            let nr = syscall_number(name).ok_or(SandboxError::UnknownSyscall {
                policy: self.name,
                name,
            })?;
            numbers.push(nr as u32);
        }
        allow_list(&numbers).ok_or(SandboxError::TooLarge { policy: self.name })
    }

    /// Confines the calling thread (and the threads it starts from now on)
    /// to this policy.
    pub fn apply(&self) -> Result<(), SandboxError> {
        let program = self.compile()?;
        // Named first: a report during the call names what it was for.
        THREAD_POLICY.with(|p| p.set(self.name));
        seccompiler::apply_filter(&program).map_err(|source| SandboxError::Apply {
            policy: self.name,
            source,
        })
    }
}

// Classic BPF as seccomp runs it (linux/filter.h, linux/seccomp.h).
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
/// What `openat` returns under a policy that does not allow it.
const OPEN_REFUSED: u32 = RET_ERRNO | libc::EACCES as u32;

/// Where a jump of the decision tree goes, before offsets are known.
#[derive(Clone, Copy)]
enum To {
    Next,
    At(usize),
    Allow,
    Trap,
}

/// A filter that allows exactly the calls `numbers` (native x86_64 calls
/// only) and traps on anything else but `openat`, which fails with
/// EACCES: glibc opens files of its own accord in any thread (the first
/// time a thread's malloc heap shrinks it reads
/// /proc/sys/vm/overcommit_memory; sizing its arenas it reads
/// /sys/devices/system/cpu/online) and carries on when the open fails,
/// so a refused open costs nothing while a trap there would end a
/// process serving every VM for a call no code of ours made. Code of ours
/// that opens a file under such a policy still fails, with an error
/// naming the file. The rest is a binary search over the ranges
/// of consecutive numbers rather than one comparison after another: the
/// kernel evaluates the filter for every call number once when it is
/// installed (to cache the calls it always allows), and a chain of 50
/// comparisons made that, with the JIT of a program five times longer,
/// most of the 0.2-0.3 ms each thread's filter cost. None when the tree
/// does not fit classic BPF's 8-bit jump offsets (over 80 or so ranges).
pub fn allow_list(numbers: &[u32]) -> Option<BpfProgram> {
    let mut sorted = numbers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for nr in sorted {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == nr => *hi = nr,
            _ => ranges.push((nr, nr)),
        }
    }
    let mut tree: Vec<(u16, u32, To, To)> = Vec::new();
    fn emit(ranges: &[(u32, u32)], tree: &mut Vec<(u16, u32, To, To)>) {
        match ranges {
            [] => tree.push((RET_K, RET_TRAP, To::Next, To::Next)),
            [(lo, hi)] if lo == hi => tree.push((JEQ_K, *lo, To::Allow, To::Trap)),
            [(lo, hi)] => {
                tree.push((JGE_K, *lo, To::Next, To::Trap));
                tree.push((JGT_K, *hi, To::Trap, To::Allow));
            }
            _ => {
                let mid = ranges.len() / 2;
                let at = tree.len();
                tree.push((JGE_K, ranges[mid].0, To::Next, To::Next));
                emit(&ranges[..mid], tree);
                tree[at].2 = To::At(tree.len());
                emit(&ranges[mid..], tree);
            }
        }
    }
    emit(&ranges, &mut tree);
    let insn = |code: u16, k: u32, jt: u8, jf: u8| sock_filter { code, jt, jf, k };
    let mut program = vec![
        insn(LD_W_ABS, DATA_ARCH, 0, 0),
        insn(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        insn(RET_K, RET_KILL_PROCESS, 0, 0),
        insn(LD_W_ABS, DATA_NR, 0, 0),
    ];
    let openat = libc::SYS_openat as u32;
    if !ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&openat)) {
        program.push(insn(JEQ_K, openat, 0, 1));
        program.push(insn(RET_K, OPEN_REFUSED, 0, 0));
    }
    let (allow, trap) = (tree.len(), tree.len() + 1);
    for (i, &(code, k, jt, jf)) in tree.iter().enumerate() {
        let offset = |to: To| -> Option<u8> {
            let target = match to {
                To::Next => i + 1,
                To::At(j) => j,
                To::Allow => allow,
                To::Trap => trap,
            };
            u8::try_from(target - i - 1).ok()
        };
        program.push(insn(code, k, offset(jt)?, offset(jf)?));
    }
    program.push(insn(RET_K, RET_ALLOW, 0, 0));
    program.push(insn(RET_K, RET_TRAP, 0, 0));
    Some(program)
}

/// Installs the SIGSYS handler that reports a forbidden call: one line on
/// standard error naming the program, the thread's policy and the call,
/// then the process ends with [`FORBIDDEN_EXIT`].
pub fn install_reporter(program: &'static str) -> Result<(), SandboxError> {
    PROGRAM.store(Box::leak(Box::new(program)), Ordering::SeqCst);
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler of the right
    // signature; the handler only reads memory that stays valid (a leaked
    // string, const-initialised thread locals) and calls write and _exit.
    let r = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(SandboxError::Reporter(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A line built without allocating (the handler may not allocate).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SIGSYS's siginfo carries the call's number after the address of the
    // call (`_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`,
    // at byte 16 of the union on x86_64).
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo, and a
    // seccomp trap fills its _sigsys member.
    let nr = unsafe { *(info as *const u8).add(16 + 8).cast::<libc::c_int>() };
    let program = PROGRAM.load(Ordering::SeqCst);
    let program = if program.is_null() {
        "process"
    } else {
        // SAFETY: not null: the leaked string stored by install_reporter.
        unsafe { *program }
    };
    let policy = THREAD_POLICY.with(|p| p.get());
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    // The thread's name too (prctl is allowed everywhere): a thread that
    // inherited its filter without confining itself is found by it.
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    line.push(program.as_bytes());
    line.push(b": seccomp: thread \"");
    line.push(&name[..name_len]);
    line.push(b"\" under the \"");
    line.push(policy.as_bytes());
    line.push(b"\" policy made a forbidden system call: ");
    line.push(syscall_name(i64::from(nr)).unwrap_or("unknown").as_bytes());
    line.push(b" (");
    line.number(nr as u64);
    line.push(b"); ending the process (run with --no-seccomp to find what else it needs)\n");
    // SAFETY: write and _exit are async-signal-safe, and every policy
    // allows them.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(FORBIDDEN_EXIT);
    }
}

/// For tests of a program's policies: runs this test binary again (test
/// `test`), where the thread confines itself to `policy` and does `act`,
/// and returns the child's exit status and standard error. In that child
/// the call with the matching policy acts and exits 0 if it survived
/// (the point is usually that it does not), and the others return `None`.
fn outcome_under(policy: &Policy, test: &str, act: impl FnOnce()) -> Option<(Option<i32>, String)> {
    const CHILD: &str = "SANDBOX_TEST_POLICY";
    if let Ok(wanted) = std::env::var(CHILD) {
        if wanted != policy.name {
            return None;
        }
        if enable("test").and_then(|()| policy.apply()).is_err() {
            std::process::exit(2);
        }
        act();
        std::process::exit(0);
    }
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, policy.name)
        .output()
        .ok()?;
    Some((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// For tests of a program's policies: asserts that a thread confined to
/// `policy` that makes system call `call` ends the process with
/// [`FORBIDDEN_EXIT`] and a report naming the policy and the call. `test`
/// is the calling test's name: the check runs in a child process, this
/// test binary run again.
pub fn assert_forbidden_call_is_reported(policy: &Policy, test: &str, call: &'static str) {
    let nr = syscall_number(call).unwrap_or(-1);
    let Some((status, stderr)) = outcome_under(policy, test, || {
        // SAFETY: a raw system call with zero arguments; if the filter let
        // it through, it fails harmlessly and the process says so.
        unsafe { libc::syscall(nr, 0, 0, 0) };
        eprintln!("{call} was allowed under {:?}", policy.name);
    }) else {
        return;
    };
    assert_eq!(status, Some(FORBIDDEN_EXIT), "{}: {stderr}", policy.name);
    let report = format!(
        "under the \"{}\" policy made a forbidden system call: {call} ({nr})",
        policy.name
    );
    assert!(stderr.contains(&report), "{}: {stderr}", policy.name);
}

/// For tests of a program's policies: asserts that a thread confined to
/// `policy`, which does not allow `openat`, gets EACCES for the file
/// glibc opens on its own when a malloc heap shrinks, and that the
/// process lives on (see [`allow_list`]). Run as
/// [`assert_forbidden_call_is_reported`] is.
pub fn assert_open_is_refused_quietly(policy: &Policy, test: &str) {
    const SAID: &str = "open refused with EACCES, still running";
    let Some((status, stderr)) = outcome_under(policy, test, || {
        match std::fs::File::open("/proc/sys/vm/overcommit_memory") {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => eprintln!("{SAID}"),
            other => eprintln!("open under {:?}: {other:?}", policy.name),
        }
    }) else {
        return;
    };
    assert_eq!(status, Some(0), "{}: {stderr}", policy.name);
    assert!(stderr.contains(SAID), "{}: {stderr}", policy.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_libc() {
        assert_eq!(syscall_number("read"), Some(libc::SYS_read));
        assert_eq!(
            syscall_number("io_uring_enter"),
            Some(libc::SYS_io_uring_enter)
        );
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        assert_eq!(syscall_name(10_000), None);
        assert_eq!(syscall_number("no_such_call"), None);
    }

    /// Runs a filter on one call as the kernel would (the subset of
    /// classic BPF the filters use).
    fn run(program: &[sock_filter], nr: u32, arch: u32) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        for _ in 0..program.len() {
            let i = &program[pc];
            let jump = |taken: bool| pc + 1 + usize::from(if taken { i.jt } else { i.jf });
            pc = match i.code {
                LD_W_ABS => {
                    a = if i.k == DATA_ARCH { arch } else { nr };
                    pc + 1
                }
                JEQ_K => jump(a == i.k),
                JGT_K => jump(a > i.k),
                JGE_K => jump(a >= i.k),
                RET_K => return i.k,
                other => panic!("unexpected instruction {other:#x}"),
            };
        }
        panic!("ran off the end")
    }

    #[test]
    fn the_filter_allows_exactly_its_calls() {
        // Deterministic pseudo-random subsets of the call table.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let count = 1 + round % 70;
            let allowed: Vec<u32> = (0..count).map(|_| (next() % 470) as u32).collect();
            let program = allow_list(&allowed).expect("fits");
            for nr in (0..600).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                let want = if allowed.contains(&nr) {
                    RET_ALLOW
                } else if nr == libc::SYS_openat as u32 {
                    OPEN_REFUSED
                } else {
                    RET_TRAP
                };
                assert_eq!(run(&program, nr, AUDIT_ARCH_X86_64), want, "nr {nr}");
            }
            assert_eq!(run(&program, allowed[0], 0x4000_0003), RET_KILL_PROCESS);
        }
        assert_eq!(
            run(&allow_list(&[]).expect("fits"), 0, AUDIT_ARCH_X86_64),
            RET_TRAP
        );
    }

    #[test]
    fn a_filter_is_a_search_not_a_chain() {
        // 60 scattered calls: a chain compares up to 60 times, the tree 7.
        let allowed: Vec<u32> = (0..60).map(|i| i * 7).collect();
        let program = allow_list(&allowed).expect("fits");
        assert!(
            program.len() < 2 * allowed.len() + 8,
            "{} instructions",
            program.len()
        );
    }

    #[test]
    fn an_unknown_name_is_refused_by_name() {
        let p = Policy {
            name: "test",
            groups: &[&["read", "no_such_call"]],
        };
        let e = p.compile().expect_err("refused");
        assert!(e.to_string().contains("no_such_call"), "{e}");
    }
}

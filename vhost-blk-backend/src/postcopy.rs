//! Postcopy (PAGEFAULT): a vmm restoring a VM lazily asks us to register
//! our mapping of guest memory with a userfaultfd and hands its faults to
//! its pager (POSTCOPY_ADVISE gives it the descriptor, the memory table's
//! reply our mapping's addresses, and the memory is used only once it acks
//! the table): a page the pager has not filled yet is never a page of
//! zeros here.

use std::fs::File;
use std::io;

use tracing::info;
use vhost::vhost_user::Result as VuResult;
use vm_memory::GuestMemoryRegion;

use vhost_user_session::memory::MappedRegion;
use vhost_user_session::refuse;

/// Whether this process can make a userfaultfd that also takes the
/// kernel's faults (io_uring's, pread's into guest memory): probed once,
/// as the user it serves as (see [`probe_paging`]).
static PAGING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A userfaultfd that takes the kernel's faults too, made by the system
/// call (the `userfaultfd` crate's builder opens /dev/userfaultfd first,
/// which a session's filter does not allow).
fn new_userfault() -> io::Result<userfaultfd::Uffd> {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    // SAFETY: the userfaultfd system call with flags only; the result is
    // checked and owned below.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just made, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct uffdio_api: the API version in, the features and ioctls out.
    let mut api = [0xaa_u64, 0, 0];
    const UFFDIO_API: u64 = 0xc018_aa3f;
    // SAFETY: UFFDIO_API on the new descriptor with its 24-byte argument,
    // alive for the call.
    if unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            UFFDIO_API as _,
            api.as_mut_ptr(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a userfaultfd whose API handshake is done, given up here.
    Ok(unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) })
}

/// Offers postcopy (PAGEFAULT) only if a userfaultfd can be made here:
/// called once privileges are what they stay, before any session.
pub fn probe_paging() {
    match new_userfault() {
        Ok(_) => PAGING.store(true, std::sync::atomic::Ordering::Relaxed),
        Err(e) => info!("postcopy (a restoring vmm paging our faults) is not offered: {e}"),
    }
}

/// Whether postcopy is offered (see [`probe_paging`]).
pub fn offered() -> bool {
    PAGING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Postcopy's state on one connection.
#[derive(Default)]
pub struct Postcopy {
    uffd: Option<userfaultfd::Uffd>,
    listening: bool,
    /// A memory table mapped and registered, used once the frontend acks.
    pub pending: Option<Vec<MappedRegion>>,
}

impl Postcopy {
    /// Whether the vmm pages our faults now.
    pub fn active(&self) -> bool {
        self.uffd.is_some()
    }

    /// POSTCOPY_ADVISE: a userfaultfd, a copy of which goes to the vmm.
    pub fn advise(&mut self) -> VuResult<File> {
        if !offered() {
            return Err(refuse("POSTCOPY_ADVISE: postcopy was not offered".into()));
        }
        let uffd =
            new_userfault().map_err(|e| refuse(format!("POSTCOPY_ADVISE: userfaultfd: {e}")))?;
        let handed = std::os::fd::AsFd::as_fd(&uffd)
            .try_clone_to_owned()
            .map_err(|e| refuse(format!("POSTCOPY_ADVISE: {e}")))?;
        self.uffd = Some(uffd);
        Ok(File::from(handed))
    }

    /// POSTCOPY_LISTEN.
    pub fn listen(&mut self) -> VuResult<()> {
        if self.uffd.is_none() {
            return Err(refuse("POSTCOPY_LISTEN before POSTCOPY_ADVISE".into()));
        }
        self.listening = true;
        Ok(())
    }

    /// Registers a region just mapped with the userfaultfd.
    pub fn register(&self, r: &MappedRegion) -> VuResult<()> {
        let Some(uffd) = &self.uffd else {
            return Err(refuse(
                "a postcopy memory table before POSTCOPY_ADVISE".into(),
            ));
        };
        uffd.register(r.region.as_ptr().cast(), r.region.len() as usize)
            .map(drop)
            .map_err(|e| {
                refuse(format!(
                    "memory region at {:#x}: registering it for postcopy: {e}",
                    r.at.guest_addr
                ))
            })
    }

    /// Ends postcopy: our mapping of `regions` is the kernel's again (a
    /// fault waiting on it is woken and served with what the memory holds).
    pub fn end(&mut self, regions: &[MappedRegion]) {
        if let Some(uffd) = self.uffd.take() {
            for r in regions {
                let _ = uffd.unregister(r.region.as_ptr().cast(), r.region.len() as usize);
            }
        }
        *self = Postcopy::default();
    }
}

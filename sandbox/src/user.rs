//! Dropping root once what needs it is open.

use std::ffi::CString;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum UserError {
    #[error("no user {0:?} on this system")]
    NoSuchUser(String),
    #[error("{0:?} is not a user name")]
    BadName(String),
    #[error("cannot become user {user:?} ({what})")]
    Switch {
        user: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Becomes `user` (its uid and primary group, no supplementary groups),
/// for good: root cannot be regained.
pub fn drop_privileges(user: &str) -> Result<(u32, u32), UserError> {
    let (uid, gid) = lookup(user)?;
    let fail = |what| {
        let source = std::io::Error::last_os_error();
        UserError::Switch {
            user: user.to_string(),
            what,
            source,
        }
    };
    // SAFETY: plain credential calls; each result is checked.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(fail("setresuid"));
        }
    }
    Ok((uid, gid))
}

/// `user`'s uid and primary group.
pub fn lookup(user: &str) -> Result<(u32, u32), UserError> {
    let name = CString::new(user).map_err(|_| UserError::BadName(user.to_string()))?;
    // SAFETY: getpwnam_r with a buffer of the size given and a passwd to
    // fill; the result pointer is checked before use.
    let (uid, gid) = unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if r != 0 || result.is_null() {
            return Err(UserError::NoSuchUser(user.to_string()));
        }
        (pw.pw_uid, pw.pw_gid)
    };
    Ok((uid, gid))
}

//! Brings `lo` up inside a container's fresh network namespace (libcontainer leaves it down).
//! Done from a short-lived thread of the keeper: setns(CLONE_NEWNET) only affects that thread.

use std::fs::File;

use crate::sandbox::error::{Error, Result};

pub fn bring_up_lo(pid: i32) -> Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || -> Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        // SAFETY: plain ioctls on a socket we own, with a zeroed, correctly sized ifreq.
        unsafe {
            let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if sock < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
                *d = *s as libc::c_char;
            }
            let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
            if rc == 0 {
                req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
                rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
            }
            let err = std::io::Error::last_os_error();
            libc::close(sock);
            if rc != 0 {
                return Err(err.into());
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| Error::Container("lo setup thread panicked".into()))?
}

//! Brings `lo` up inside a container's fresh network namespace (libcontainer leaves it down).
//! Done from a short-lived thread of the keeper: setns(CLONE_NEWNET) only affects that thread.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::sandbox::error::ContainerError;

pub fn bring_up_lo(pid: i32) -> Result<(), ContainerError> {
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(ContainerError::Loopback)?;
    std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // SAFETY: `ifreq` is a plain C struct (arrays and a union of integers) for which all
        // zero bytes are a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes `ifru_flags` within the
        // `ifreq` we own; the socket is open for the whole call. (Neither nix nor rustix wraps
        // the interface-flag ioctls.)
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: reading the union member SIOCGIFFLAGS just filled in.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: SIOCSIFFLAGS only reads the `ifreq` we own.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .map_err(|_| ContainerError::LoopbackPanicked)?
    .map_err(ContainerError::Loopback)
}

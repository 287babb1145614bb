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

/// A TCP socket listening on `127.0.0.1:port` inside the network namespace of the process
/// `pidfd` names (a parked container's init), for the runner to serve: the sandbox's only way
/// out (its namespace has nothing but `lo`). A socket keeps the namespace it was created in, so
/// accepting it from the runner's namespace is what lets the proxy reach the outside.
///
/// Made on a thread of its own that exits afterwards: setns(CLONE_NEWNET) moves only the
/// calling thread, and a pooled thread (tokio's blocking pool, which also runs name lookups)
/// must never be left inside a sandbox's namespace. `pidfd` names that exact process, so a
/// reused pid cannot lead into another namespace.
pub fn listen_in(
    pidfd: std::os::fd::BorrowedFd<'_>,
    port: u16,
) -> Result<std::net::TcpListener, ContainerError> {
    let ns = pidfd
        .try_clone_to_owned()
        .map_err(ContainerError::EgressListener)?;
    std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| ContainerError::LoopbackPanicked)?
    .map_err(ContainerError::EgressListener)
}

//! CVE-2019-5736: the container init is a clone of the zygote, so before its execve
//! `/proc/<pid>/exe` is the runner binary. Like youki (pentacle), the zygote re-executes
//! itself from a sealed memfd copy, so that path can never be opened for writing.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MemFdCreateFlag, memfd_create};

const SEALS: SealFlag = SealFlag::from_bits_truncate(
    SealFlag::F_SEAL_SEAL.bits()
        | SealFlag::F_SEAL_SHRINK.bits()
        | SealFlag::F_SEAL_GROW.bits()
        | SealFlag::F_SEAL_WRITE.bits(),
);

/// True when the running executable is a sealed memfd.
pub fn is_sealed() -> bool {
    File::open("/proc/self/exe")
        .ok()
        .and_then(|f| fcntl(f.as_raw_fd(), FcntlArg::F_GET_SEALS).ok())
        .map(|s| SealFlag::from_bits_truncate(s).contains(SEALS))
        .unwrap_or(false)
}

/// Re-executes the current program from a sealed memfd unless already running from one.
/// Returns only on error.
pub fn ensure_sealed() -> io::Result<()> {
    if is_sealed() {
        return Ok(());
    }
    let mut exe = File::open("/proc/self/exe")?;
    let name: &CStr = c"toolwarden-sealed";
    let memfd = memfd_create(
        name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut out = File::from(memfd);
    io::copy(&mut exe, &mut out)?;
    fcntl(out.as_raw_fd(), FcntlArg::F_ADD_SEALS(SEALS))?;
    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.into_encoded_bytes()).map_err(io::Error::other))
        .collect::<io::Result<_>>()?;
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut b = k.into_encoded_bytes();
            b.push(b'=');
            b.extend(v.into_encoded_bytes());
            CString::new(b).map_err(io::Error::other)
        })
        .collect::<io::Result<_>>()?;
    let err = nix::unistd::fexecve(out.as_fd().as_raw_fd(), &args, &env).unwrap_err();
    Err(err.into())
}

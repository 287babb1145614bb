//! The engine's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("system call: {0}")]
    Nix(#[from] nix::Error),
    #[error("invalid invocation: {0}")]
    Invalid(String),
    #[error("zygote: {0}")]
    Zygote(String),
    #[error("container: {0}")]
    Container(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

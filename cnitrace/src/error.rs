//! The library's error type: each variant names the problem and, where there is one, the fix.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Kallsyms(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "cnitrace needs root or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE \
         (CAP_SYS_ADMIN on kernels before 5.8); missing: {missing}. Run it as root or grant them \
         (the DaemonSet does)"
    )]
    NotPrivileged { missing: String },
    #[error("kernel BTF: {0}")]
    Btf(String),
    #[error("the embedded eBPF object is inconsistent: {0}")]
    Object(String),
    #[error("failed to load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("reading map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

impl From<cnitrace_netns::Error> for Error {
    fn from(e: cnitrace_netns::Error) -> Self {
        match e {
            cnitrace_netns::Error::Io { what, source } => Self::Io { what, source },
            cnitrace_netns::Error::Invalid(message) => Self::InvalidArgument(message),
        }
    }
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub fn program(what: impl Into<String>, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            what: what.into(),
            source: Box::new(source),
        }
    }

    pub fn map(map: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            map,
            source: Box::new(source),
        }
    }
}

//! Kernel-facing mechanisms. Each reports what it could attach and why not; nothing above this
//! module needs privileges.

pub mod btf;
pub mod clock;
pub mod privileges;
pub mod sampling;
pub mod tracefs;

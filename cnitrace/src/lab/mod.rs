//! The lab: datapaths built on one machine. For now, the project's own tc program with an
//! adjustable amount of work per packet, attached to a device in a named namespace.

pub mod bench;
pub mod net;
pub mod policy;
pub mod redirect;
pub mod sweep;
pub mod tc_work;
pub mod topology;
pub mod traffic;

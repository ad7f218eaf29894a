//! The lab: CNI-shaped datapaths built from network namespaces on one machine, their
//! benchmark, the netfilter rule sweep, kube-proxy's Services, and the project's tc program
//! with an adjustable amount of work per packet.

pub mod bench;
pub mod net;
pub mod node_rules;
pub mod policy;
pub mod redirect;
pub mod services;
pub mod sweep;
pub mod tc_work;
pub mod topology;
pub mod traffic;

//! cnitrace: CPU cycles per packet for each kernel component of the container datapath.
//!
//! Data flows one way: kernel hooks -> per-CPU aggregates in BPF maps ([`probe`]) -> snapshots
//! ([`snapshot`]) -> a window ([`window`], the one path every caller takes) -> a pure breakdown
//! ([`breakdown`]) filling the public contract ([`contract`]) -> renderers ([`render`], [`flame`], the
//! server). Everything above [`probe`] runs without privileges on recorded or synthetic data.

pub mod agent;
pub mod attribution;
pub mod breakdown;
pub mod cni_config;
pub mod collect;
pub mod components;
pub mod contract;
pub mod doctor;
pub mod error;
pub mod flame;
pub mod kallsyms;
pub mod lab;
pub mod netfilter;
pub mod netns;
pub mod perf_import;
pub mod probe;
pub mod profile;
pub mod render;
pub mod repair;
pub mod server;
pub mod snapshot;
pub mod window;

pub use error::Error;

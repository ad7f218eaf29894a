//! Kernel-facing mechanisms. Each reports what it could attach and why not; nothing above this
//! module needs privileges.

pub mod bpf_stats;
pub mod btf;
pub mod clock;
pub mod privileges;
pub mod sampling;
pub mod trace;
pub mod tracefs;

/// The eBPF object built by build.rs from cnitrace-ebpf, embedded in the binary.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cnitrace"));

#[cfg(test)]
mod tests {
    use object::{
        Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind,
    };

    /// A call to a compiler builtin becomes a BPF subprogram that kallsyms lists as a program of
    /// its own (`bpf_prog_<tag>_memset`), outside cnitrace's names, and would be counted as
    /// datapath BPF. No program section may call one.
    #[test]
    fn programs_call_no_compiler_builtins() {
        let file = object::File::parse(super::EBPF_OBJECT).expect("the embedded eBPF object");
        let mut programs = 0;
        for section in file.sections() {
            let name = section.name().unwrap_or("");
            if section.kind() != SectionKind::Text || name == ".text" {
                continue;
            }
            programs += 1;
            for (_, relocation) in section.relocations() {
                if let RelocationTarget::Symbol(index) = relocation.target() {
                    let target = file
                        .symbol_by_index(index)
                        .and_then(|s| s.name())
                        .unwrap_or("");
                    assert!(
                        !["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&target),
                        "{name} calls the builtin {target}"
                    );
                }
            }
        }
        assert!(
            programs >= 5,
            "expected every program section, found {programs}"
        );
    }
}

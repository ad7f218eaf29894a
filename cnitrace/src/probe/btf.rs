//! Kernel struct layouts from BTF (/sys/kernel/btf/vmlinux), so the packet counter reads
//! `sk_buff` and `net_device` fields at the running kernel's offsets (no headers, no CO-RE).

use std::path::Path;

use btf_rs::{Btf, Type};

use crate::error::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Offsets the packet counter needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketOffsets {
    pub skb_len: u32,
    pub skb_head: u32,
    pub skb_end: u32,
    pub shinfo_gso_segs: u32,
    pub dev_name: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
}

fn no_btf(detail: String) -> Error {
    Error::Btf(detail)
}

/// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
pub fn member_offset(btf: &Btf, name: &str, member: &str) -> Result<u32, Error> {
    let candidates = btf
        .resolve_types_by_name(name)
        .map_err(|e| no_btf(format!("struct {name}: {e}")))?;
    for candidate in candidates {
        if let Type::Struct(s) | Type::Union(s) = candidate
            && let Some(bits) = find_in(btf, &s, member, 0)
        {
            return Ok(bits / 8);
        }
    }
    Err(no_btf(format!(
        "struct {name} has no member `{member}` in this kernel's BTF"
    )))
}

fn find_in(btf: &Btf, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Option<u32> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let bits = base_bits + m.bit_offset();
        if name == member {
            return Some(bits);
        }
        if name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(found) = find_in(btf, &inner, member, bits)
        {
            return Some(found);
        }
    }
    None
}

/// Reads the offsets from the running kernel's BTF.
pub fn packet_offsets() -> Result<PacketOffsets, Error> {
    packet_offsets_from(Path::new(VMLINUX))
}

pub fn packet_offsets_from(path: &Path) -> Result<PacketOffsets, Error> {
    let btf = Btf::from_file(path).map_err(|e| {
        no_btf(format!(
            "cannot read {} ({e}): the packet counter needs kernel BTF (CONFIG_DEBUG_INFO_BTF=y)",
            path.display()
        ))
    })?;
    Ok(PacketOffsets {
        skb_len: member_offset(&btf, "sk_buff", "len")?,
        skb_head: member_offset(&btf, "sk_buff", "head")?,
        skb_end: member_offset(&btf, "sk_buff", "end")?,
        shinfo_gso_segs: member_offset(&btf, "skb_shared_info", "gso_segs")?,
        dev_name: member_offset(&btf, "net_device", "name")?,
        dev_ifindex: member_offset(&btf, "net_device", "ifindex")?,
        dev_nd_net: member_offset(&btf, "net_device", "nd_net")?,
        net_ns_inum: member_offset(&btf, "net", "ns")? + member_offset(&btf, "ns_common", "inum")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_layout() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: {VMLINUX} missing on this kernel");
            return;
        }
        let o = packet_offsets().unwrap();
        // Stable for a decade: gso_segs follows flags, meta_len, nr_frags, tx_flags, gso_size.
        assert_eq!(o.shinfo_gso_segs, 6);
        // head and end are distinct pointer-sized fields of a ~200-byte sk_buff.
        assert!(
            o.skb_head != o.skb_end && o.skb_head < 256 && o.skb_end < 256,
            "{o:?}"
        );
        assert!(o.dev_ifindex < 4096 && o.dev_name < 4096, "{o:?}");
    }

    #[test]
    fn missing_file_names_the_fix() {
        let err = packet_offsets_from(Path::new("/nonexistent/vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}

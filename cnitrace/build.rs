//! Builds the eBPF object (cnitrace-ebpf, nightly, bpfel-unknown-none) and leaves it in `OUT_DIR`,
//! from where `include_bytes_aligned!` embeds it in the binary.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../cnitrace-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cnitrace-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

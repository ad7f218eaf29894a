//! Kernel symbolization: /proc/kallsyms parsed into a sorted table for address lookups.

use std::path::Path;

use crate::error::Error;

/// Drops compiler-generated suffixes (`.cold`, `.isra.0`, `.constprop.0`, `.part.0`), so the
/// split-off parts of a function count as the function.
pub fn base_name(symbol: &str) -> &str {
    symbol.split_once('.').map_or(symbol, |(base, _)| base)
}

/// Text symbols of the running kernel, its modules and JITed BPF programs.
#[derive(Debug, Default)]
pub struct Kallsyms {
    /// Sorted by address.
    addresses: Vec<u64>,
    names: Vec<Box<str>>,
    /// Whether each symbol belongs to a module (`[bridge]`) rather than vmlinux.
    in_module: Vec<bool>,
}

impl Kallsyms {
    pub const PATH: &'static str = "/proc/kallsyms";

    /// Reads and parses /proc/kallsyms.
    pub fn load() -> Result<Self, Error> {
        Self::load_from(Path::new(Self::PATH))
    }

    pub fn load_from(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: format!("read {}", path.display()),
            source,
        })?;
        let symbols = Self::parse(&text);
        if symbols.addresses.is_empty() {
            return Err(Error::Kallsyms(format!(
                "{} lists no text symbol with an address (kernel.kptr_restrict hides them from \
                 processes without CAP_SYSLOG: run as root)",
                path.display()
            )));
        }
        Ok(symbols)
    }

    /// Parses the kallsyms text format: `ADDR TYPE NAME [MODULE]`. Keeps text symbols (t/T/w/W)
    /// with a non-zero address.
    pub fn parse(text: &str) -> Self {
        let mut entries: Vec<(u64, Box<str>, bool)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_ascii_whitespace();
                let address = u64::from_str_radix(fields.next()?, 16).ok()?;
                let kind = fields.next()?;
                let name = fields.next()?;
                let module = fields.next().is_some_and(|m| m.starts_with('['));
                let is_text = matches!(kind, "t" | "T" | "w" | "W");
                (is_text && address != 0).then(|| (address, Box::from(name), module))
            })
            .collect();
        entries.sort_unstable_by_key(|&(address, ..)| address);
        let mut symbols = Self::default();
        for (address, name, module) in entries {
            symbols.addresses.push(address);
            symbols.names.push(name);
            symbols.in_module.push(module);
        }
        symbols
    }

    /// The function containing `address`, if any symbol starts at or below it.
    pub fn resolve(&self, address: u64) -> Option<&str> {
        let index = match self.addresses.binary_search(&address) {
            Ok(exact) => exact,
            Err(0) => return None,
            Err(insert_at) => insert_at - 1,
        };
        Some(&self.names[index])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| base_name(n) == name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Every symbol with its address, in address order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.names
            .iter()
            .zip(&self.addresses)
            .map(|(name, &address)| (name.as_ref(), address))
    }

    /// Whether `name` is a module's symbol (not vmlinux's, so not in vmlinux BTF).
    pub fn in_module(&self, name: &str) -> bool {
        self.names
            .iter()
            .zip(&self.in_module)
            .any(|(n, &module)| module && n.as_ref() == name)
    }

    /// All symbol names (for availability checks done once per window).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(AsRef::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t br_forward
ffffffff81001400 t br_forward.cold
ffffffff81002000 D some_data
0000000000000000 t hidden
ffffffffc0001000 t vxlan_xmit\t[vxlan]
ffffffffc0002000 t bpf_prog_0123456789abcdef_cnitrace_tx\t[bpf]
";

    #[test]
    fn parses_text_symbols_with_modules() {
        let syms = Kallsyms::parse(SAMPLE);
        assert_eq!(syms.len(), 5);
        assert_eq!(syms.resolve(0xffff_ffff_8100_1010), Some("br_forward"));
        assert_eq!(syms.resolve(0xffff_ffff_8100_1400), Some("br_forward.cold"));
        assert_eq!(syms.resolve(0xffff_ffff_c000_1abc), Some("vxlan_xmit"));
        assert_eq!(syms.resolve(0x1000), None);
        assert!(syms.contains("br_forward"));
        assert!(!syms.contains("some_data"));
        assert!(!syms.contains("hidden"));
    }

    #[test]
    fn hidden_addresses_are_an_error() {
        let dir = std::env::temp_dir().join(format!("cnitrace-kallsyms-{}", std::process::id()));
        std::fs::write(&dir, "0000000000000000 T _stext\n").unwrap();
        let err = Kallsyms::load_from(&dir).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(err.contains("kptr_restrict"), "{err}");
    }

    #[test]
    fn loads_this_kernel() {
        // Root sees addresses; otherwise the error must say why.
        match Kallsyms::load() {
            Ok(syms) => assert!(syms.len() > 1000),
            Err(err) => assert!(err.to_string().contains("kptr_restrict")),
        }
    }
}

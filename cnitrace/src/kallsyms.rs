//! Kernel symbolization: /proc/kallsyms parsed into a sorted table for address lookups.

use std::path::Path;

use crate::error::Error;

/// Drops compiler-generated suffixes (`.cold`, `.isra.0`, `.constprop.0`, `.part.0`), so the
/// split-off parts of a function count as the function.
pub fn base_name(symbol: &str) -> &str {
    symbol.split_once('.').map_or(symbol, |(base, _)| base)
}

/// Text symbols of the running kernel, its modules and JITed BPF programs.
///
/// Names live in one string arena (about 3 MB for 120k symbols) rather than one allocation
/// each, and the file is read line by line: the table is the agent's largest long-lived
/// structure and its parse was the peak of the agent's memory.
#[derive(Debug, Default)]
pub struct Kallsyms {
    /// Sorted by address.
    symbols: Vec<Symbol>,
    /// Every name, one after another; a symbol holds its range.
    names: String,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    address: u64,
    name_start: u32,
    name_len: u16,
    /// Whether the symbol belongs to a module (`[bridge]`) rather than vmlinux; a u8 keeps
    /// the struct at 16 bytes.
    in_module: u8,
}

impl Kallsyms {
    pub const PATH: &'static str = "/proc/kallsyms";

    /// Reads and parses /proc/kallsyms.
    pub fn load() -> Result<Self, Error> {
        Self::load_from(Path::new(Self::PATH))
    }

    pub fn load_from(path: &Path) -> Result<Self, Error> {
        let io_error = |source| Error::Io {
            what: format!("read {}", path.display()),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
        let mut symbols = Self::default();
        let mut line = String::new();
        loop {
            line.clear();
            if std::io::BufRead::read_line(&mut reader, &mut line).map_err(io_error)? == 0 {
                break;
            }
            symbols.push_line(&line);
        }
        symbols.finish();
        if symbols.symbols.is_empty() {
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
        let mut symbols = Self::default();
        for line in text.lines() {
            symbols.push_line(line);
        }
        symbols.finish();
        symbols
    }

    fn push_line(&mut self, line: &str) {
        let mut fields = line.split_ascii_whitespace();
        let (Some(address), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            return;
        };
        let Ok(address) = u64::from_str_radix(address, 16) else {
            return;
        };
        if address == 0 || !matches!(kind, "t" | "T" | "w" | "W") {
            return;
        }
        let (Ok(name_start), Ok(name_len)) =
            (u32::try_from(self.names.len()), u16::try_from(name.len()))
        else {
            return;
        };
        let in_module = fields.next().is_some_and(|m| m.starts_with('['));
        self.names.push_str(name);
        self.symbols.push(Symbol {
            address,
            name_start,
            name_len,
            in_module: u8::from(in_module),
        });
    }

    fn finish(&mut self) {
        self.symbols.sort_unstable_by_key(|s| s.address);
        self.symbols.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    fn name(&self, symbol: &Symbol) -> &str {
        let start = symbol.name_start as usize;
        &self.names[start..start + usize::from(symbol.name_len)]
    }

    /// The function containing `address`, if any symbol starts at or below it.
    pub fn resolve(&self, address: u64) -> Option<&str> {
        let index = match self.symbols.binary_search_by_key(&address, |s| s.address) {
            Ok(exact) => exact,
            Err(0) => return None,
            Err(insert_at) => insert_at - 1,
        };
        Some(self.name(&self.symbols[index]))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names().any(|n| base_name(n) == name)
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Every symbol with its address, in address order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.symbols.iter().map(|s| (self.name(s), s.address))
    }

    /// Whether `name` is a module's symbol (not vmlinux's, so not in vmlinux BTF).
    pub fn in_module(&self, name: &str) -> bool {
        self.symbols
            .iter()
            .any(|s| s.in_module != 0 && self.name(s) == name)
    }

    /// All symbol names (for availability checks done once per window).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.symbols.iter().map(|s| self.name(s))
    }
}

const _: () = assert!(std::mem::size_of::<Symbol>() == 16);

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

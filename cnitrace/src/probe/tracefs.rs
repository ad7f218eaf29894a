//! tracefs: finding (or mounting) it and reading tracepoint formats, so field offsets come from
//! the running kernel rather than from headers.

use std::path::{Path, PathBuf};

use crate::error::Error;

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs root; mounts it at /sys/kernel/tracing when nothing is mounted (as root can).
pub fn ensure_mounted() -> Result<PathBuf, Error> {
    if let Some(root) = find() {
        return Ok(root);
    }
    let target = Path::new(CANDIDATES[0]);
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| Error::NoTracefs(format!("mount failed: {errno}")))?;
    tracing::info!("mounted tracefs at {}", target.display());
    find().ok_or_else(|| Error::NoTracefs("mounted but events/ is missing".to_owned()))
}

/// The tracefs root if one is mounted.
pub fn find() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Offset of `field` in a tracepoint's format file text.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        let offset = line
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        offset.trim().parse().ok()
    })
}

/// Reads the offsets of `fields` of `category/name`.
pub fn offsets(
    root: &Path,
    category: &str,
    name: &str,
    fields: &[&str],
) -> Result<Vec<u32>, Error> {
    let path = root.join("events").join(category).join(name).join("format");
    let format = std::fs::read_to_string(&path).map_err(|e| Error::Tracepoint {
        tracepoint: format!("{category}:{name}"),
        detail: format!("cannot read {}: {e}", path.display()),
    })?;
    fields
        .iter()
        .map(|field| {
            field_offset(&format, field).ok_or_else(|| Error::Tracepoint {
                tracepoint: format!("{category}:{name}"),
                detail: format!("no field `{field}` in {}", path.display()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: net_dev_start_xmit
ID: 2307
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;
\tfield:const void * skbaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int len;\toffset:36;\tsize:4;\tsigned:0;
\tfield:u16 gso_segs;\toffset:60;\tsize:2;\tsigned:0;
";

    #[test]
    fn parses_field_offsets() {
        assert_eq!(field_offset(FORMAT, "name"), Some(8));
        assert_eq!(field_offset(FORMAT, "skbaddr"), Some(16));
        assert_eq!(field_offset(FORMAT, "len"), Some(36));
        assert_eq!(field_offset(FORMAT, "gso_segs"), Some(60));
        assert_eq!(field_offset(FORMAT, "gso_size"), None);
    }
}

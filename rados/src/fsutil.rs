//! Files a daemon or tool keeps across restarts (identity, config, addresses) are replaced durably: a crash
//! leaves either the old contents or the new, never a torn or empty file.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`: written to a temporary file beside it, flushed to the disk, renamed over
/// `path`, and the directory flushed so the rename itself survives a power cut.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} names no file", path.display()))
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("cuttle-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("whoami");
        write_durably(&p, b"1\n").unwrap();
        write_durably(&p, b"2\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary left behind");
        assert!(write_durably(&dir.join("missing").join("x"), b"").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

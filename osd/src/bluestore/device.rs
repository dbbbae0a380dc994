//! The IO seam: every byte BlueStore reads or writes (the block file and redb's file) goes through
//! [`BlockDevice`], so that the crash tests can put both files on one simulated disk
//! ([`super::simdisk::SimDisk`]) and cut its power anywhere.
//!
//! [`Env`] is the directory a store lives in: it opens devices by name and writes small files durably.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A file-like device. Writes may sit in a volatile cache until [`BlockDevice::flush`] returns.
// `len` as redb's `StorageBackend` and `File::set_len` name it; an empty device is not a state worth a method.
#[allow(clippy::len_without_is_empty)]
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write that returned before this call durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Grows (with zeros) or shrinks the device.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// [`BlockDevice::write_at`] for large writes nobody reads back soon: a device that can writes them past
    /// the OS page cache when `offset`, the length and `data`'s address are multiples of [`DIRECT_ALIGN`]
    /// (see [`AlignedBuf`]). Durable only after [`BlockDevice::flush`], like any write.
    fn write_direct_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)
    }
}

/// What direct IO needs aligned: file offset, length and memory address.
pub const DIRECT_ALIGN: usize = 4096;

/// Zeroed bytes that start at a [`DIRECT_ALIGN`] boundary in memory (over-allocated and sliced: no `unsafe`).
pub struct AlignedBuf {
    v: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + DIRECT_ALIGN];
        let at = v.as_ptr().align_offset(DIRECT_ALIGN);
        assert!(at < DIRECT_ALIGN, "a byte pointer can always be aligned");
        AlignedBuf { v, at, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.at..self.at + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + self.len]
    }
}

/// Buffered writes go to the page cache at most this many bytes at a time. The kernel builds a folio per
/// write up to the write's size, and a later 4 KiB write into a large folio costs in proportion to the folio
/// (ext4 walks its buffer heads): measured, 2 MiB folios left by 4 MiB writes made 4 KiB overwrites spend a
/// quarter of an OSD's CPU in `ext4_block_write_begin`.
const BUFFERED_WRITE_BYTES_MAX: usize = 64 << 10;

/// A real file, read and written with positioned IO; large aligned writes go through a second descriptor
/// opened with `O_DIRECT` (when the file system takes it), so they cost no page-cache copy.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    direct: Option<File>,
}

impl FileDevice {
    /// Opens (or creates) `path` and takes an exclusive lock on it, so two processes never share a store.
    pub fn open(path: &Path, create: bool) -> io::Result<FileDevice> {
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!("{} is in use by another process", path.display()),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // tmpfs and some others refuse O_DIRECT: then every write is buffered.
        let direct =
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).map_err(|e| {
                tracing::debug!("{}: no direct IO ({e}); writes go through the page cache", path.display());
            });
        Ok(FileDevice { file, direct: direct.ok() })
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn write_direct_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
        match &self.direct {
            Some(d) if aligned(offset as usize) && aligned(data.len()) && aligned(data.as_ptr() as usize) => {
                d.write_all_at(data, offset)
            }
            _ => {
                for (i, piece) in data.chunks(BUFFERED_WRITE_BYTES_MAX).enumerate() {
                    self.file.write_all_at(piece, offset + (i * BUFFERED_WRITE_BYTES_MAX) as u64)?;
                }
                Ok(())
            }
        }
    }
}

/// redb's storage over a [`BlockDevice`]: redb's file lives wherever the block file does (a directory, or
/// the simulated disk), in the same power domain. Once `fenced` is set it refuses every write: a failed store
/// must not let redb make its non-durable commits durable when it closes (they may point at deferred writes
/// that never went in place; the WAL replays them at the next mount).
#[derive(Debug)]
pub struct RedbBackend {
    pub dev: Arc<dyn BlockDevice>,
    pub fenced: Arc<AtomicBool>,
}

impl RedbBackend {
    pub fn new(dev: Arc<dyn BlockDevice>) -> RedbBackend {
        RedbBackend { dev, fenced: Arc::new(AtomicBool::new(false)) }
    }

    fn check(&self) -> Result<(), io::Error> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(io::Error::other("the store failed: its metadata file takes no more writes"));
        }
        Ok(())
    }
}

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.dev.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.dev.read_at(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.check()?;
        self.dev.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.check()?;
        self.dev.flush()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.check()?;
        self.dev.write_at(offset, data)
    }
}

/// Where a store's files live.
pub trait Env: Send + Sync + std::fmt::Debug {
    /// Opens the device file `name`; `create` makes it if missing.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockDevice>>;
    /// Whether the file `name` exists.
    fn exists(&self, name: &str) -> io::Result<bool>;
    /// Replaces the file `name` with `data` atomically and durably.
    fn write_durable(&self, name: &str, data: &[u8]) -> io::Result<()>;
    /// The whole file `name`, or `None` if it does not exist.
    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// For messages: where the store is.
    fn describe(&self) -> String;
}

/// A directory of the real file system.
#[derive(Debug)]
pub struct DirEnv {
    dir: PathBuf,
}

impl DirEnv {
    pub fn new(dir: &Path) -> DirEnv {
        DirEnv { dir: dir.to_path_buf() }
    }
}

impl Env for DirEnv {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(FileDevice::open(&self.dir.join(name), create)?))
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        self.dir.join(name).try_exists()
    }

    /// Write a temporary file, fsync it, rename it over the old one, fsync the directory: after a crash the
    /// name holds the old bytes or the new ones, never a mix.
    fn write_durable(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all_at(data, 0)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(name))?;
        File::open(&self.dir)?.sync_all()
    }

    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_buffered_writes_read_back_the_same() {
        // Goal: write_direct_at puts the same bytes in the file whichever way it goes (O_DIRECT when offset,
        // length and address are aligned; buffered in pieces otherwise), and reads through the page cache see
        // them, also over bytes a buffered write cached before. Method: a file in the temp directory.
        let path = std::env::temp_dir().join(format!("cuttle-device-test-{}", std::process::id()));
        let dev = FileDevice::open(&path, true).unwrap();
        dev.set_len(1 << 20).unwrap();
        dev.write_at(8192, &[7u8; 4096]).unwrap();
        let mut read = vec![0u8; 4096];
        dev.read_at(8192, &mut read).unwrap(); // cached now
        let mut buf = AlignedBuf::zeroed(256 << 10);
        assert!((buf.as_slice().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        dev.write_direct_at(0, buf.as_slice()).unwrap(); // aligned: direct where the file system allows
        let odd = vec![9u8; 100_000];
        dev.write_direct_at(300_001, &odd).unwrap(); // unaligned: buffered
        dev.flush().unwrap();
        let mut back = vec![0u8; 256 << 10];
        dev.read_at(0, &mut back).unwrap();
        assert_eq!(back, buf.as_slice(), "the direct write replaced the cached bytes too");
        let mut back = vec![0u8; odd.len()];
        dev.read_at(300_001, &mut back).unwrap();
        assert_eq!(back, odd);
        drop(dev);
        std::fs::remove_file(&path).unwrap();
    }
}

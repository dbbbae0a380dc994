//! The IO seam: every byte BlueStore reads or writes (the block file and redb's file) goes through
//! [`BlockDevice`], so that the crash tests can put both files on one simulated disk
//! ([`super::simdisk::SimDisk`]) and cut its power anywhere.
//!
//! [`Env`] is the directory a store lives in: it opens devices by name and writes small files durably.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
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
}

/// A real file, read and written with positioned IO.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
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
        Ok(FileDevice { file })
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

//! Read-only views of the inputs: bytes (a slice or a memory map), the data extents of a
//! sparse file (its holes read as zeros by POSIX, so they are never touched: reading a
//! hole through the page cache costs as much as reading data), SHA-256 over the view,
//! and release of mapped pages once a pass is done so resident memory stays bounded.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use sha2::{Digest, Sha256};

use crate::DeltaError;

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Feeds `len` zero bytes to a SHA-256 state.
pub(crate) fn hash_zeros(h: &mut Sha256, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// An input file kept open and mapped for the duration of one build or apply.
pub(crate) struct MappedFile {
    file: File,
    map: Option<Mmap>,
    extents: Option<Vec<(u64, u64)>>,
    path: PathBuf,
}

impl MappedFile {
    pub(crate) fn open(path: &Path) -> Result<Self, DeltaError> {
        let file = File::open(path).map_err(|e| DeltaError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| DeltaError::io("stat", path, e))?
            .len();
        if usize::try_from(len).is_err() {
            return Err(DeltaError::TooLarge {
                what: path.display().to_string(),
                size: len,
            });
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only. Like every mmap user we rely on nobody
            // truncating or rewriting the image while it is mapped; if someone does,
            // the SHA-256 checks of build and apply report a mismatch (or the process
            // gets SIGBUS on truncation), never a silently wrong image.
            let m = unsafe { Mmap::map(&file) }.map_err(|e| DeltaError::io("map", path, e))?;
            Some(m)
        };
        let extents = data_extents(&file, len);
        Ok(MappedFile {
            file,
            map,
            extents,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.len() as u64)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn image(&self) -> Image<'_> {
        Image {
            bytes: self.map.as_deref().unwrap_or(&[]),
            file: Some(&self.file),
            map: self.map.as_ref(),
            extents: self.extents.as_deref(),
        }
    }
}

/// A view of one image: its bytes plus what we know about its holes.
pub(crate) struct Image<'a> {
    bytes: &'a [u8],
    file: Option<&'a File>,
    map: Option<&'a Mmap>,
    /// Sorted, disjoint data extents; everything outside is a hole. None = all data.
    extents: Option<&'a [(u64, u64)]>,
}

impl<'a> Image<'a> {
    pub(crate) fn from_bytes(bytes: &'a [u8]) -> Self {
        Image {
            bytes,
            file: None,
            map: None,
            extents: None,
        }
    }

    #[inline]
    pub(crate) fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// True if `[start, end)` lies entirely in a hole (so it is all zeros, unread).
    #[inline]
    pub(crate) fn is_hole(&self, start: u64, end: u64) -> bool {
        match self.extents {
            None => false,
            Some(ext) => {
                let i = ext.partition_point(|&(_, e)| e <= start);
                ext.get(i).is_none_or(|&(s, _)| s >= end)
            }
        }
    }

    /// SHA-256 of the whole image. Files are read with `pread` into a small buffer (so
    /// hashing neither maps nor keeps pages), holes are hashed as zeros without reading.
    pub(crate) fn sha256(&self) -> io::Result<[u8; 32]> {
        let mut h = Sha256::new();
        let len = self.bytes.len() as u64;
        match self.file {
            None => h.update(self.bytes),
            Some(file) => {
                let whole = [(0u64, len)];
                let ext = self.extents.unwrap_or(&whole);
                let mut buf = vec![0u8; 1 << 20];
                let mut pos = 0u64;
                for &(s, e) in ext {
                    let e = e.min(len);
                    if s >= e {
                        continue;
                    }
                    hash_zeros(&mut h, s - pos);
                    pos = s;
                    while pos < e {
                        let n = (e - pos).min(buf.len() as u64) as usize;
                        file.read_exact_at(&mut buf[..n], pos)?;
                        h.update(&buf[..n]);
                        pos += n as u64;
                    }
                }
                hash_zeros(&mut h, len - pos);
            }
        }
        Ok(h.finalize().into())
    }

    /// Drops the pages of `[start, end)` from this process's mapping (they stay in the
    /// page cache; touching them again simply re-maps them). No-op for plain slices.
    pub(crate) fn release(&self, start: usize, end: usize) {
        let Some(map) = self.map else { return };
        let page = page_size();
        let start = start / page * page;
        let end = end.min(map.len());
        if start >= end {
            return;
        }
        // SAFETY: the mapping is a read-only, file-backed shared map. MADV_DONTNEED
        // only unmaps its pages; later reads fault them in again from the file, so no
        // slice handed out by `bytes()` ever observes different contents.
        let r =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        if let Err(e) = r {
            tracing::debug!(error = %e, "madvise(DONTNEED) failed; resident memory may grow");
        }
    }

    /// Releases the whole mapping (see `release`).
    pub(crate) fn release_all(&self) {
        self.release(0, self.bytes.len());
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Data extents of a file via `SEEK_DATA`/`SEEK_HOLE`; None if the filesystem cannot say
/// (then the whole file is treated as data, which is always correct, only slower).
fn data_extents(file: &File, len: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let len_i = i64::try_from(len).ok()?;
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while pos < len_i {
        // SAFETY: `fd` is an open descriptor owned by `file` for the whole call; lseek
        // only moves the file offset, which nothing else here uses (reads are pread).
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`: the rest is a hole
            }
            return None;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h <= d {
            return None;
        }
        let h = h.min(len_i);
        out.push((d as u64, h as u64));
        pos = h;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_file_extents_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        f.sync_all().unwrap();
        drop(f);

        let m = MappedFile::open(&path).unwrap();
        let img = m.image();
        assert_eq!(m.len(), 8 << 20);
        // Whatever the filesystem reports, the data itself is never called a hole.
        assert!(!img.is_hole(3 << 20, (3 << 20) + 1));
        assert!(!img.is_hole(0, 8 << 20));
        let expected: [u8; 32] = Sha256::digest(std::fs::read(&path).unwrap()).into();
        assert_eq!(img.sha256().unwrap(), expected);
        img.release_all();
        assert_eq!(img.bytes()[(3 << 20) + 4999], 7);
    }

    #[test]
    fn hole_lookup() {
        let ext = [(4096u64, 8192u64), (16384, 20000)];
        let img = Image {
            bytes: &[],
            file: None,
            map: None,
            extents: Some(&ext),
        };
        assert!(img.is_hole(0, 4096));
        assert!(!img.is_hole(0, 4097));
        assert!(img.is_hole(8192, 16384));
        assert!(!img.is_hole(8191, 8192));
        assert!(!img.is_hole(19999, 30000));
        assert!(img.is_hole(20000, 30000));
    }

    #[test]
    fn empty_file_maps_to_empty_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        File::create(&path).unwrap();
        let m = MappedFile::open(&path).unwrap();
        assert_eq!(m.len(), 0);
        let expected: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(m.image().sha256().unwrap(), expected);
    }
}

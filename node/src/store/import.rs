//! Import of a local file into the store: one pass of positional reads, checksums per
//! chunk, all-zero chunks (and holes of a sparse source) left as holes. Registering the
//! result and making its marks durable is the store's ordinary path.

use super::*;

/// Called for each chunk of a scanned file: index, bytes (empty for a chunk that lies in a
/// hole of the source), checksums.
type ChunkVisitor<'a> = dyn FnMut(ChunkIndex, &[u8], &ChunkInfo) -> Result<(), StoreError> + 'a;

/// Deletes a file on drop unless disarmed: the temporary file of an import that failed.
struct TempFile(Option<PathBuf>);
impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl Inner {
    pub(super) fn import(
        &self,
        path: &Path,
        image: &ImageRef,
        chunk_size: u32,
        base: Option<ImageRef>,
        kind: ObjectKind,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, StoreError> {
        image.validate().map_err(StoreError::Invalid)?;
        if let Some(b) = &base {
            b.validate()
                .map_err(|e| StoreError::Invalid(format!("base: {e}")))?;
        }
        let cs = if chunk_size == 0 {
            DEFAULT_CHUNK_SIZE
        } else {
            chunk_size
        };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) || cs % 4096 != 0 {
            return Err(StoreError::Invalid(format!(
                "chunk size {cs} must be a multiple of 4096 between {MIN_CHUNK_SIZE} and \
                 {MAX_CHUNK_SIZE}"
            )));
        }
        let (src, size) = open_source(path)?;
        let count = size.div_ceil(cs as u64);
        if count > MAX_CHUNKS as u64 {
            let need = size.div_ceil(MAX_CHUNKS as u64).next_multiple_of(4096);
            return Err(StoreError::Invalid(format!(
                "{} is {size} bytes: {count} chunks of {cs} bytes, more than the limit of \
                 {MAX_CHUNKS}; use a chunk size of at least {need}",
                path.display()
            )));
        }
        if let Some(existing) = read(&self.images).by_ref.get(image).copied() {
            return self.import_existing(&src, path, existing, size, cs, base, kind, progress);
        }

        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .images_dir
            .join(format!(".import-{}-{n}.tmp", std::process::id()));
        let mut guard = TempFile(Some(tmp.clone()));
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        out.set_len(size).map_err(|e| io_err(&tmp, e))?;
        let through_map = self.opts.mmap_writes;
        let chunks = scan_source(&src, path, size, cs, progress, &mut |idx, data, info| {
            if info.zero {
                return Ok(());
            }
            region::write_region(&out, &tmp, idx as u64 * cs as u64, data, through_map)
        })?;
        let m = Manifest {
            name: image.name.clone(),
            version: image.version.clone(),
            base,
            kind,
            size,
            chunk_size: cs,
            chunks,
        };
        m.validate()
            .map_err(|e| StoreError::InvalidManifest(e.to_string()))?;
        let id = m.id();

        let _s = lock(&self.structure);
        let (same, other) = {
            let images = read(&self.images);
            (
                images.by_id.get(&id).cloned(),
                images.by_ref.get(image).copied(),
            )
        };
        if let Some(e) = same {
            // Someone added the same manifest while we read: fill what it lacks.
            drop(_s);
            for idx in (0..e.total()).filter(|&i| !e.held.get(i)) {
                let data = region::read_region(&out, &tmp, m.chunk_offset(idx), m.chunk_len(idx))?;
                self.write(&e, idx, &data, false)?;
            }
            self.commit()?;
            return Ok(m);
        }
        if let Some(existing) = other {
            return Err(StoreError::VersionExists {
                image: image.clone(),
                existing,
                detail: format!("{} hashes to {id}", path.display()),
            });
        }
        let final_path = self.image_path(&id);
        fs::rename(&tmp, &final_path).map_err(|e| io_err(&final_path, e))?;
        guard.0 = Some(final_path.clone());
        // The records start with only the zero chunks durable; the data chunks are held in
        // memory at once and made durable by a commit (fsync first), like downloaded
        // ones, so import does not wait for the disk. A crash before that commit leaves
        // the image known but missing chunks, which a new import or a download fills.
        let entry = Arc::new(Entry::new(Arc::new(m.clone()), final_path, out, None));
        let zero_only = lock(&entry.persisted).clone();
        self.insert_records(&m, id, &zero_only)?;
        guard.0 = None;
        let data_chunks: Vec<ChunkIndex> = (0..m.chunk_count())
            .filter(|&i| !m.chunks[i as usize].zero)
            .collect();
        for &i in &data_chunks {
            entry.mark_held(i);
        }
        {
            let mut images = write(&self.images);
            images.by_ref.insert(image.clone(), id);
            images.by_id.insert(id, Arc::clone(&entry));
        }
        drop(_s);
        self.queue_commit(&entry, &data_chunks, false)?;
        info!(image = %image, id = %id, size, chunks = m.chunk_count(), zero_chunks = m.chunk_count() - m.data_chunks(), "image imported");
        Ok(m)
    }

    /// Import of a `name:version` the store knows: compare chunk by chunk, and fill
    /// chunks it still lacks from the file.
    #[allow(clippy::too_many_arguments)]
    fn import_existing(
        &self,
        src: &File,
        path: &Path,
        existing: ImageId,
        size: u64,
        cs: u32,
        base: Option<ImageRef>,
        kind: ObjectKind,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, StoreError> {
        let e = self.entry(&existing)?;
        let m = Arc::clone(&e.manifest);
        let differs = |detail: String| StoreError::VersionExists {
            image: m.image_ref(),
            existing,
            detail,
        };
        if m.size != size {
            return Err(differs(format!("{size} bytes, the stored one {}", m.size)));
        }
        if m.chunk_size != cs || m.base != base || m.kind != kind {
            return Err(differs(format!(
                "chunk size {cs}, base {base:?}, kind {kind:?}; the stored one has chunk size \
                 {}, base {:?}, kind {:?}",
                m.chunk_size, m.base, m.kind
            )));
        }
        scan_source(src, path, size, cs, progress, &mut |idx, data, info| {
            if *info != m.chunks[idx as usize] {
                return Err(differs(format!(
                    "{} differs at chunk {idx}",
                    path.display()
                )));
            }
            if !info.zero && !e.held.get(idx) {
                self.write(&e, idx, data, false)?;
            }
            Ok(())
        })?;
        self.commit()?;
        Ok((*m).clone())
    }
}

/// Opens an import source and measures it. Regular files and block devices (a VM disk
/// on an LVM volume or a disk partition) are images; anything else is refused with what
/// it is, and so is an empty source.
///
/// The open uses `O_NONBLOCK`, so a FIFO is refused at once instead of blocking the open
/// until some writer appears, and the kind comes from the opened file (`fstat`), so it
/// cannot change between the check and the reads. `O_NONBLOCK` does not change reads of
/// regular files or block devices.
pub(super) fn open_source(path: &Path) -> Result<(File, u64), StoreError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let bad = |detail: &str| StoreError::BadSource {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    let mut src = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let ft = src.metadata().map_err(|e| io_err(path, e))?.file_type();
    let what = if ft.is_dir() {
        "is a directory"
    } else if ft.is_fifo() {
        "is a named pipe (FIFO)"
    } else if ft.is_socket() {
        "is a socket"
    } else if ft.is_char_device() {
        "is a character device"
    } else {
        ""
    };
    if !what.is_empty() {
        return Err(bad(&format!(
            "{what}; an image is read from a regular file or a block device (its size must \
             be known and it is read at offsets): copy the data into a file first"
        )));
    }
    let size = source_size(&mut src).map_err(|e| io_err(path, e))?;
    if size == 0 {
        return Err(bad(
            "is empty (0 bytes); there is nothing to distribute, so it is not imported",
        ));
    }
    Ok((src, size))
}

/// Size of a regular file or of a block device. A block device's metadata length is 0;
/// seeking to its end gives its size (what the `BLKGETSIZE64` ioctl reports).
fn source_size(src: &mut File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = src.metadata()?;
    if meta.file_type().is_block_device() {
        src.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

/// Checksums of a chunk that is not all zeros. Both hashes run on this thread: hashing
/// MD5 on a second thread was measured slower here whenever the other core is busy
/// (as it is on a node that serves peers while it imports).
fn checksums(data: &[u8]) -> ChunkInfo {
    ChunkInfo {
        sha256: sha256(data),
        md5: md5::Md5::digest(data).into(),
        zero: false,
    }
}

/// Reads `size` bytes of `src` chunk by chunk (positional reads into one reused buffer),
/// computes each chunk's checksums and hands them to `each`. Chunks that lie in a hole of
/// a sparse source are not read at all: `each` gets empty data for them (they are zero).
pub(super) fn scan_source(
    src: &File,
    path: &Path,
    size: u64,
    cs: u32,
    progress: &mut dyn FnMut(u64, u64),
    each: &mut ChunkVisitor<'_>,
) -> Result<Vec<ChunkInfo>, StoreError> {
    let count = size.div_ceil(cs as u64) as u32;
    let mut chunks = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; (cs as u64).min(size) as usize];
    // Checksums of an all-zero chunk depend only on its length (full or last): once each.
    let mut zero_infos: Vec<(usize, ChunkInfo)> = Vec::new();
    let mut zero_info = |len: usize| -> ChunkInfo {
        if let Some((_, i)) = zero_infos.iter().find(|(l, _)| *l == len) {
            return i.clone();
        }
        let i = chunk_info(&vec![0u8; len]);
        zero_infos.push((len, i.clone()));
        i
    };
    let mut sparse = true;
    let mut data_region: Option<(u64, u64)> = None;
    progress(0, size);
    for idx in 0..count {
        let off = idx as u64 * cs as u64;
        let len = (size - off).min(cs as u64) as usize;
        if sparse && data_region.is_none_or(|(_, end)| off >= end) {
            data_region = region::next_data(src, off, size);
            sparse = data_region.is_some();
        }
        let in_hole = sparse && data_region.is_some_and(|(start, _)| start >= off + len as u64);
        let info = if in_hole {
            let info = zero_info(len);
            each(idx, &buf[..0], &info)?;
            info
        } else {
            let data = &mut buf[..len];
            src.read_exact_at(data, off).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    StoreError::SourceChanged {
                        path: path.to_path_buf(),
                        detail: format!("it ended before byte {}", off + len as u64),
                    }
                } else {
                    io_err(path, e)
                }
            })?;
            let info = if is_zero(data) {
                zero_info(len)
            } else {
                checksums(data)
            };
            each(idx, data, &info)?;
            info
        };
        chunks.push(info);
        progress(off + len as u64, size);
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::io::AsRawFd;

    fn refused(path: &Path) -> String {
        match open_source(path) {
            Err(e @ StoreError::BadSource { .. }) => e.to_string(),
            other => panic!("{} should be refused, got {other:?}", path.display()),
        }
    }

    #[test]
    fn sources_that_are_not_images_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refused(dir.path()).contains("is a directory"));
        let empty = dir.path().join("empty.raw");
        File::create(&empty).unwrap();
        assert!(refused(&empty).contains("is empty"));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer ever opens it: the open must not block.
        assert!(refused(&fifo).contains("is a named pipe"));
        assert!(refused(Path::new("/dev/null")).contains("is a character device"));
        let file = dir.path().join("img");
        fs::write(&file, [7u8; 5000]).unwrap();
        let (_, size) = open_source(&file).unwrap();
        assert_eq!(size, 5000);
    }

    /// A block device is sized by seeking to its end, which must agree with the kernel's
    /// `BLKGETSIZE64`. Only reads the size of the first block device this process may open
    /// (none is created: setting up a loop device would change the host); skipped without.
    #[test]
    fn block_devices_are_sized_like_the_kernel_says() {
        let Ok(entries) = fs::read_dir("/dev") else {
            return;
        };
        for e in entries.flatten() {
            // Never open anything else under /dev: opening some character devices acts.
            if !e.file_type().is_ok_and(|t| t.is_block_device()) {
                continue;
            }
            let Ok(mut f) = File::open(e.path()) else {
                continue;
            };
            let mut want: u64 = 0;
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t).
            const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
            // SAFETY: the ioctl writes one u64 into `want`.
            let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut want) };
            if rc != 0 {
                continue;
            }
            assert_eq!(source_size(&mut f).unwrap(), want, "{}", e.path().display());
            return;
        }
        eprintln!("no readable block device: block device sizing not checked");
    }
}

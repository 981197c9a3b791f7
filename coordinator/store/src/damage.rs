//! Damage detection for the redb file, before and while redb reads it.
//!
//! redb initialises a 0-byte file as a new, empty database (a silent fresh start), and it
//! `assert!`s on some damage (a file shorter than its header says, a page size it was not
//! built for) instead of returning an error. So [`check_header`] reads the file's fixed
//! header itself and names the damage first, and [`guard`] runs every call into redb under
//! `catch_unwind`, with the panic message kept off stderr, turning whatever redb still panics
//! on into [`StoreError::Corrupt`].

use std::any::Any;
use std::cell::Cell;
use std::fs::File;
use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Once;

use crate::StoreError;

/// redb's file header (file formats 2 and 3, redb 2.x; `tree_store/page_store/header.rs`):
/// the magic number, a god byte, padding, then little-endian u32s: page size, region header
/// pages, region max data pages, full regions, trailing partial region pages.
const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
const PAGE_SIZE_OFFSET: usize = 12;
const HEADER_BYTES: usize = PAGE_SIZE_OFFSET + 5 * 4;
/// The page size redb uses for files it creates.
const PAGE_SIZE: u64 = 4096;

fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn u32_at(buf: &[u8], offset: usize) -> u64 {
    let b: [u8; 4] = buf[offset..offset + 4]
        .try_into()
        .expect("a 4-byte slice of the header");
    u64::from(u32::from_le_bytes(b))
}

/// Checks an existing database file's header: not empty, redb's magic number, a sane page
/// size and region layout, and a file at least as long as the layout the header describes.
///
/// # Errors
/// [`StoreError::Corrupt`] naming the damage, or [`StoreError::Io`] when the file cannot be
/// read.
pub(crate) fn check_header(path: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(corrupt(
            path,
            "the file is empty (0 bytes): it was truncated or never written",
        ));
    }
    let mut head = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(io)?;
    if head.len() < MAGIC.len() || head[..MAGIC.len()] != MAGIC {
        return Err(corrupt(
            path,
            format!(
                "not a redb database: its first bytes are not redb's magic number ({len} bytes)"
            ),
        ));
    }
    if len < PAGE_SIZE {
        return Err(corrupt(
            path,
            format!(
                "the file is truncated: {len} bytes, shorter than redb's {PAGE_SIZE}-byte header page"
            ),
        ));
    }
    let page = u32_at(&head, PAGE_SIZE_OFFSET);
    let region_header_pages = u32_at(&head, PAGE_SIZE_OFFSET + 4);
    let region_max_pages = u32_at(&head, PAGE_SIZE_OFFSET + 8);
    let full_regions = u32_at(&head, PAGE_SIZE_OFFSET + 12);
    let trailing_pages = u32_at(&head, PAGE_SIZE_OFFSET + 16);
    if page != PAGE_SIZE {
        return Err(corrupt(
            path,
            format!("the header is garbled: page size {page}, expected {PAGE_SIZE}"),
        ));
    }
    if region_header_pages == 0
        || region_max_pages == 0
        || (full_regions == 0 && trailing_pages == 0)
    {
        return Err(corrupt(
            path,
            format!(
                "the header is garbled: region layout {full_regions} full regions of \
                 {region_header_pages}+{region_max_pages} pages, {trailing_pages} trailing pages"
            ),
        ));
    }
    // The header page, the full regions, then the trailing region (if any) with its own
    // region header: DatabaseLayout::len in redb.
    let described = full_regions
        .checked_mul((region_header_pages + region_max_pages) * page)
        .and_then(|full| {
            let trailing = if trailing_pages > 0 {
                (region_header_pages + trailing_pages) * page
            } else {
                0
            };
            full.checked_add(trailing)?.checked_add(page)
        });
    match described {
        None => Err(corrupt(path, "the header is garbled: its layout overflows")),
        Some(d) if len < d => Err(corrupt(
            path,
            format!("the file is truncated: its header describes {d} bytes, the file has {len}"),
        )),
        Some(_) => Ok(()),
    }
}

thread_local! {
    /// Set while this thread runs a [`guard`]ed call: its panics are caught and reported as
    /// errors, so the default hook must not print them.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Wraps the process's panic hook once, so that it stays silent on a thread inside [`guard`]
/// and behaves as before everywhere else.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs `f` (a call into redb) and turns a panic inside it into [`StoreError::Corrupt`]
/// naming `path` and what was being done. redb panics only on states it considers
/// impossible, which in practice means a damaged file.
pub(crate) fn guard<T>(
    path: &Path,
    doing: &str,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    install_quiet_hook();
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.unwrap_or_else(|payload| {
        Err(corrupt(
            path,
            format!(
                "the file is garbled: redb failed while {doing}: {}",
                panic_message(payload.as_ref())
            ),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_a_panic_into_corrupt_and_stays_quiet() {
        let path = Path::new("/data/state.redb");
        let err = guard(path, "reading", || -> Result<(), StoreError> {
            panic!("assertion failed: len >= layout")
        })
        .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("/data/state.redb"), "{msg}");
        assert!(
            msg.contains("garbled: redb failed while reading: assertion failed"),
            "{msg}"
        );
        // Errors and values pass through untouched.
        assert_eq!(guard(path, "x", || Ok(7)).unwrap(), 7);
        assert!(matches!(
            guard(path, "x", || -> Result<(), _> {
                Err(StoreError::Invalid("y".into()))
            }),
            Err(StoreError::Invalid(_))
        ));
        // The thread is not left quiet.
        assert!(!QUIET.with(Cell::get));
    }

    #[test]
    fn header_checks_name_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let check = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            check_header(&p).unwrap_err().to_string()
        };
        assert!(check(b"").contains("empty (0 bytes)"));
        assert!(check(b"SQLite format 3\0").contains("not a redb database"));
        assert!(check(&MAGIC).contains("truncated: 9 bytes"));
        let mut page = vec![0u8; PAGE_SIZE as usize];
        page[..MAGIC.len()].copy_from_slice(&MAGIC);
        page[PAGE_SIZE_OFFSET..PAGE_SIZE_OFFSET + 4].copy_from_slice(&512u32.to_le_bytes());
        assert!(check(&page).contains("page size 512"));
        page[PAGE_SIZE_OFFSET..PAGE_SIZE_OFFSET + 4].copy_from_slice(&4096u32.to_le_bytes());
        assert!(check(&page).contains("region layout"));
        // One trailing region of 2 header + 10 data pages: 13 pages in all.
        page[PAGE_SIZE_OFFSET + 4..PAGE_SIZE_OFFSET + 8].copy_from_slice(&2u32.to_le_bytes());
        page[PAGE_SIZE_OFFSET + 8..PAGE_SIZE_OFFSET + 12].copy_from_slice(&100u32.to_le_bytes());
        page[PAGE_SIZE_OFFSET + 16..PAGE_SIZE_OFFSET + 20].copy_from_slice(&10u32.to_le_bytes());
        assert!(check(&page).contains("describes 53248 bytes, the file has 4096"));
        let mut whole = page.clone();
        whole.resize(13 * PAGE_SIZE as usize, 0);
        std::fs::write(&p, &whole).unwrap();
        check_header(&p).unwrap();
    }
}

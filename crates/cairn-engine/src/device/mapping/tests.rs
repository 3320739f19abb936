//! The read mapping against real files: contents, bounds, faults, page-table budgets.

use super::*;
use std::io::Write;

#[test]
fn reads_what_the_file_holds_and_refuses_past_its_end() {
    let mut f = tempfile::tempfile().expect("temp file");
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    f.write_all(&data).expect("write");
    let m = ReadMapping::new(&f).expect("mapping");
    let mut buf = [0u8; 4096];
    assert!(m.read(&mut buf, 4096));
    assert_eq!(&buf[..], &data[4096..]);
    assert!(m.read(&mut buf, 0));
    assert_eq!(&buf[..], &data[..4096]);
    assert!(
        !m.read(&mut buf, 4096),
        "a read continuing the last one goes to pread"
    );
    assert!(!m.read(&mut buf, 8192), "past the end must go to pread");
    assert!(!m.read(&mut buf, u64::MAX - 10));
    let mut two = [0u8; 8192];
    assert!(m.read(&mut two, 0), "two cached blocks are copied");
    assert_eq!(&two[..], &data[..]);
    assert!(
        m.read(&mut two, 0),
        "even when they continue the last short read"
    );
    assert!(!m.read(&mut two, 4096), "past the end must go to pread");
}

#[test]
fn a_stream_of_long_reads_goes_to_pread_and_is_mapped_after() {
    let mut f = tempfile::tempfile().expect("temp file");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i / 4096) as u8).collect();
    f.write_all(&data).expect("write");
    let m = ReadMapping::new(&f).expect("mapping");
    let mut long = vec![0u8; 1 << 20];
    assert!(m.read(&mut long, 1 << 20), "a cached long read is copied");
    assert_eq!(long[..], data[1 << 20..2 << 20]);
    assert!(
        !m.read(&mut long, 2 << 20),
        "one continuing it is a stream, for pread and its readahead"
    );
    assert!(m.read(&mut long, 0), "one elsewhere is copied again");
    let chunk = |c: usize| m.populated[c / 64].load(Ordering::Relaxed) & (1 << (c % 64)) != 0;
    m.map_after_read(2 << 20, 1 << 20);
    assert!(chunk(2), "the 1 MiB chunk read whole is populated");
    m.map_after_read((3 << 20) + 4096, 8192);
    assert!(!chunk(3), "a part of a chunk does not count");
    let before = m.spans[0].load(Ordering::Relaxed);
    m.map_after_read(2 << 20, 1 << 20);
    assert_eq!(m.spans[0].load(Ordering::Relaxed), before);
    let mut one = [0u8; 4096];
    assert!(m.read(&mut one, (2 << 20) + 8192));
    assert_eq!(one, [((2 << 20) / 4096 + 2) as u8; 4096]);
}

#[test]
fn a_page_cut_off_behind_our_back_is_reported_not_fatal() {
    // The file is truncated after the mapping learned its length: the access raises SIGBUS,
    // which must turn into "use pread" for this read and every later one of that page.
    let mut f = tempfile::tempfile().expect("temp file");
    f.write_all(&[5u8; 16384]).expect("write");
    let m = ReadMapping::new(&f).expect("mapping");
    let mut buf = [1u8; 4096];
    assert!(m.read(&mut buf, 8192));
    assert_eq!(buf, [5u8; 4096]);
    f.set_len(4096).expect("truncate");
    assert!(
        !m.read(&mut buf, 8192),
        "a vanished page must not read as data"
    );
    assert!(
        !m.read(&mut buf, 0),
        "after a bad page, every read goes to pread"
    );
    drop(m);
    let m = ReadMapping::new(&f).expect("mapping");
    assert!(
        m.read(&mut buf, 0),
        "a new mapping of the file is whole again"
    );
    assert_eq!(buf, [5u8; 4096]);
}

#[test]
fn fragment_reads_copy_up_to_four_blocks() {
    let mut f = tempfile::tempfile().expect("temp file");
    let data: Vec<u8> = (0..32768u32).map(|i| (i * 13) as u8).collect();
    f.write_all(&data).expect("write");
    let m = ReadMapping::new(&f).expect("mapping");
    let mut four = vec![0u8; 16384];
    assert!(m.read_fragment(&mut four, 8192));
    assert_eq!(&four[..], &data[8192..8192 + 16384]);
    let mut five = vec![0u8; 20480];
    assert!(
        m.read_fragment(&mut five, 0),
        "five cached blocks are copied"
    );
    assert_eq!(&five[..], &data[..20480]);
    assert!(!m.read_fragment(&mut five, 16384), "past the end");
}

#[test]
fn residency_is_reported_and_prefetch_never_faults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    f.write_all(&[3u8; 16384]).expect("write");
    let m = ReadMapping::new(&f).expect("mapping");
    assert_eq!(m.is_resident(4096), Some(true), "just written");
    assert_eq!(m.is_resident(16384), None, "past the end");
    f.sync_all().expect("sync");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    let tmpfs = rustix::fs::statfs(dir.path()).expect("statfs").f_type as i64 == 0x0102_1994;
    let mut two = [0u8; 8192];
    if !tmpfs {
        assert_eq!(m.is_resident(4096), Some(false), "evicted");
        assert!(
            !m.read_cached(&mut two, 0),
            "a long read of evicted pages goes to pread and its readahead"
        );
        assert!(!m.read_fragment(&mut [0u8; 20480], 0));
        let mut one = [0u8; 4096];
        assert!(m.read(&mut one, 4096), "a short read faults its page in");
        assert_eq!(one, [3u8; 4096]);
        assert_eq!(m.is_resident(4096), Some(true));
        assert!(
            !m.read_cached(&mut two, 0),
            "one page of the read still evicted"
        );
    }
    let mut one = [0u8; 4096];
    assert!(m.read(&mut one, 0));
    assert_eq!(one, [3u8; 4096]);
    assert!(m.read_cached(&mut two, 0), "both pages cached now");
    assert_eq!(two, [3u8; 8192]);
    // A prefetch neither reads the page in nor faults, even where the file was cut short
    // behind the mapping's back (a read there raises SIGBUS).
    m.prefetch(4096);
    f.set_len(4096).expect("truncate");
    m.prefetch(8192);
    m.prefetch(u64::MAX - 10);
    let mut buf = [0u8; 4096];
    assert!(m.read(&mut buf, 0), "the mapping is not marked broken");
    assert_eq!(buf, [3u8; 4096]);
}

#[test]
fn page_tables_are_dropped_past_the_budget_and_reads_stay_right() {
    // 16 spans of 2 MiB, each block holding its own number; a budget of 3 spans.
    let mut f = tempfile::tempfile().expect("temp file");
    let blocks = 16 * 512;
    let data: Vec<u8> = (0..blocks as u32)
        .flat_map(|b| [b.to_le_bytes(); 1024])
        .flatten()
        .collect();
    f.write_all(&data).expect("write");
    let m = std::sync::Arc::new(ReadMapping::with_budget(&f, 3).expect("mapping"));
    let check = |m: &ReadMapping, block: u64| {
        let mut buf = [0u8; 4096];
        if m.read(&mut buf, block * 4096) {
            assert_eq!(buf[..4], (block as u32).to_le_bytes(), "block {block}");
        }
    };
    for span in 0..2 {
        check(&m, span * 512 + 7);
    }
    assert_eq!(m.page_tables_dropped(), 0, "two spans touched");
    check(&m, 2 * 512 + 9);
    assert_eq!(
        m.page_tables_dropped(),
        1,
        "the third span reaches the budget"
    );
    check(&m, 2 * 512 + 9);
    assert_eq!(
        m.is_resident(2 * 512 * 4096),
        Some(true),
        "still in the page cache"
    );
    // Long reads count too, each span once.
    let mut long = vec![0u8; 4 << 20];
    assert!(m.read(&mut long, 4 << 20));
    assert_eq!(long[..4], 1024u32.to_le_bytes());
    assert_eq!(m.page_tables_dropped(), 1);
    assert!(m.read(&mut long, 12 << 20));
    assert_eq!(m.page_tables_dropped(), 2);
    // Readers racing the drops never see anything but the file's bytes.
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut x = t + 1;
                for _ in 0..20_000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    check(&m, (x >> 33) % blocks as u64);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader");
    }
    assert!(
        m.page_tables_dropped() > 10,
        "the readers crossed the budget many times"
    );
}

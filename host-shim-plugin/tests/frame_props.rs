//! Property tests for the shim's ttrpc frame codec: any byte stream, delivered in any chunking,
//! reads without a panic, re-encodes to exactly the bytes it consumed, and never makes the
//! reader allocate more than the bytes that actually arrived allow (a header may announce up to
//! 4 GiB). The inputs behind the items are kept as regression cases.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::task::{Context, Poll};

use cnfs_host_shim::shim::frames::{Frame, Incoming, HEADER_LEN, MAX_PAYLOAD, READ_CHUNK};
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

/// Records the largest single allocation made by this thread since the last reset.
struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the allocator also runs while thread-locals are torn down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

// SAFETY: every call is passed on unchanged to the system allocator; only sizes are noted.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// A reader that hands out at most `chunk` bytes per read, as a socket may.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.data.len().min(self.chunk).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// What reading a whole input gave.
struct Outcome {
    items: Vec<Incoming>,
    /// Bytes left unread when reading stopped.
    left: usize,
    clean_end: bool,
    largest_allocation: usize,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// Reads frames until the end or the first error, on this thread (so that its allocations are
/// the ones measured).
fn read_all(rt: &tokio::runtime::Runtime, input: &[u8], chunk: usize) -> Outcome {
    let mut items = Vec::with_capacity(input.len() / HEADER_LEN + 1);
    let mut rd = Chunked {
        data: input,
        chunk: chunk.max(1),
    };
    let mut largest = 0;
    let clean_end = rt.block_on(async {
        loop {
            LARGEST.with(|l| l.set(0));
            let r = Frame::read(&mut rd).await;
            largest = largest.max(LARGEST.with(Cell::get));
            match r {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    });
    Outcome {
        items,
        left: rd.data.len(),
        clean_end,
        largest_allocation: largest,
    }
}

/// The most a read may allocate for `input`: one buffer of the first chunk, or twice what
/// arrived (the buffer doubles), and never more than the frame bound.
fn allocation_bound(input: &[u8]) -> usize {
    READ_CHUNK.max(2 * input.len()).min(MAX_PAYLOAD) + 1024
}

fn check(rt: &tokio::runtime::Runtime, input: &[u8], chunk: usize) -> Result<(), TestCaseError> {
    let out = read_all(rt, input, chunk);
    prop_assert!(
        out.largest_allocation <= allocation_bound(input),
        "allocated {} for {} input bytes",
        out.largest_allocation,
        input.len()
    );
    // Frames re-encode to exactly the bytes they were read from.
    let mut again = Vec::new();
    for item in &out.items {
        match item {
            Incoming::Frame(f) => rt.block_on(f.write(&mut again)).map_err(|e| {
                TestCaseError::fail(format!("re-encoding a frame that was read: {e}"))
            })?,
            Incoming::Oversized(h) => {
                prop_assert!(h.len as usize > MAX_PAYLOAD);
                prop_assert!(input.len() >= HEADER_LEN + h.len as usize);
                return Ok(());
            }
        }
    }
    prop_assert_eq!(&input[..again.len()], &again[..]);
    if out.clean_end {
        prop_assert_eq!(out.left, 0);
        prop_assert_eq!(again.len(), input.len());
    }
    Ok(())
}

/// A header (announcing any length) and a body of some length, often not the announced one.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        0u32..64,
        any::<u32>(),
        Just(MAX_PAYLOAD as u32),
        Just(MAX_PAYLOAD as u32 + 1),
        Just(u32::MAX),
    ];
    (
        len,
        any::<u32>(),
        any::<u8>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..128),
    )
        .prop_map(|(len, stream, kind, flags, body)| {
            let mut b = len.to_be_bytes().to_vec();
            b.extend_from_slice(&stream.to_be_bytes());
            b.extend_from_slice(&[kind, flags]);
            b.extend_from_slice(&body);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(
        input in prop::collection::vec(any::<u8>(), 0..1024),
        chunk in 1usize..64,
    ) {
        let rt = runtime();
        check(&rt, &input, chunk)?;
    }

    #[test]
    fn header_like_streams_never_panic_or_overallocate(
        parts in prop::collection::vec(framed(), 1..6),
        chunk in prop_oneof![1usize..16, Just(usize::MAX)],
    ) {
        let rt = runtime();
        check(&rt, &parts.concat(), chunk)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn written_frames_read_back_unchanged(
        frames in prop::collection::vec(
            (any::<u32>(), any::<u8>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..512)),
            0..8,
        ),
        chunk in 1usize..4096,
    ) {
        let rt = runtime();
        let frames: Vec<Frame> = frames
            .into_iter()
            .map(|(stream_id, kind, flags, payload)| Frame { stream_id, kind, flags, payload })
            .collect();
        let mut bytes = Vec::new();
        for f in &frames {
            rt.block_on(f.write(&mut bytes)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let out = read_all(&rt, &bytes, chunk);
        prop_assert!(out.clean_end);
        let back: Vec<Frame> = out
            .items
            .into_iter()
            .filter_map(|i| match i {
                Incoming::Frame(f) => Some(f),
                Incoming::Oversized(_) => None,
            })
            .collect();
        prop_assert_eq!(back, frames);
    }
}

// ---- regression cases from issue 10 (items 12 and the allocation bound) -------------------

fn header(len: u32, stream: u32) -> Vec<u8> {
    let mut b = len.to_be_bytes().to_vec();
    b.extend_from_slice(&stream.to_be_bytes());
    b.extend_from_slice(&[1, 0]);
    b
}

#[test]
fn a_16_mib_announcement_with_three_bytes_allocates_one_chunk() {
    let rt = runtime();
    let mut input = header(MAX_PAYLOAD as u32, 1);
    input.extend_from_slice(&[1, 2, 3]);
    let out = read_all(&rt, &input, usize::MAX);
    assert!(!out.clean_end);
    assert!(
        out.largest_allocation <= READ_CHUNK + 1024,
        "{}",
        out.largest_allocation
    );
}

#[test]
fn announcements_over_the_bound_allocate_nothing_large() {
    let rt = runtime();
    for len in [MAX_PAYLOAD as u32 + 1, u32::MAX] {
        let out = read_all(&rt, &header(len, 1), 7);
        assert!(!out.clean_end);
        assert!(
            out.largest_allocation <= 16 << 10,
            "{len}: {}",
            out.largest_allocation
        );
    }
}

#[test]
fn an_oversized_frame_is_skipped_without_holding_its_payload() {
    let rt = runtime();
    let len = MAX_PAYLOAD + 1;
    let mut input = header(len as u32, 1);
    input.resize(HEADER_LEN + len, 0x5a);
    let next = Frame {
        stream_id: 3,
        kind: 1,
        flags: 0,
        payload: b"after".to_vec(),
    };
    rt.block_on(next.write(&mut input)).expect("write");
    let out = read_all(&rt, &input, 1 << 20);
    assert!(out.clean_end);
    assert!(
        out.largest_allocation <= READ_CHUNK + 1024,
        "skipping held {} bytes",
        out.largest_allocation
    );
    match &out.items[..] {
        [Incoming::Oversized(h), Incoming::Frame(f)] => {
            assert_eq!((h.len as usize, h.stream_id), (len, 1));
            assert_eq!(f, &next);
        }
        other => panic!("{other:?}"),
    }
}

//! ttrpc framing, just enough to proxy opaquely: a 10-byte header (payload length u32 BE,
//! stream id u32 BE, type u8, flags u8) and the payload. Frames are forwarded byte for byte
//! (the proxy only renumbers stream ids towards the delegate); only the few requests CNFS
//! intercepts are decoded (ttrpc's own `Request`/`Response`).
//!
//! Bounds: a frame announcing more than [`MAX_PAYLOAD`] is skipped without being held in
//! memory and reported as [`Incoming::Oversized`] (the proxy answers that one message with
//! `RESOURCE_EXHAUSTED`, as ttrpc itself does, and keeps the connection); a payload buffer grows
//! with the bytes that actually arrive, so a header that announces 16 MiB and sends nothing
//! costs [`READ_CHUNK`] bytes, not 16 MiB.

use protobuf::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER_LEN: usize = 10;
pub const TYPE_REQUEST: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;
pub const TYPE_DATA: u8 = 3;
/// A data frame's sender closed its half of the stream.
pub const FLAG_REMOTE_CLOSED: u8 = 1;
/// ttrpc's default message limit is 4 MiB; anything larger is not ttrpc we should pass on.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// A payload buffer starts at this size (or less) and grows as bytes arrive.
pub const READ_CHUNK: usize = 64 << 10;

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub stream_id: u32,
    pub kind: u8,
    pub flags: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream_id: u32,
    pub kind: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// What [`Frame::read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Frame(Frame),
    /// A frame over [`MAX_PAYLOAD`]: its payload was read and dropped, the stream is in sync.
    Oversized(Header),
}

impl Incoming {
    pub fn stream_id(&self) -> u32 {
        match self {
            Incoming::Frame(f) => f.stream_id,
            Incoming::Oversized(h) => h.stream_id,
        }
    }
}

impl Frame {
    /// Reads one frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Incoming>> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = r.read(&mut h[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
            got += n;
        }
        let header = Header {
            len: u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
            stream_id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            kind: h[8],
            flags: h[9],
        };
        let len = header.len as usize;
        if len > MAX_PAYLOAD {
            // Skip it through a small fixed buffer: the connection stays in sync.
            let skipped =
                tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink()).await?;
            if skipped < len as u64 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(Some(Incoming::Oversized(header)));
        }
        let payload = read_payload(r, len).await?;
        Ok(Some(Incoming::Frame(Frame {
            stream_id: header.stream_id,
            kind: header.kind,
            flags: header.flags,
            payload,
        })))
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        buf.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&self.stream_id.to_be_bytes());
        buf.push(self.kind);
        buf.push(self.flags);
        buf.extend_from_slice(&self.payload);
        w.write_all(&buf).await
    }

    /// The ttrpc request in a request frame.
    pub fn request(&self) -> Option<ttrpc::proto::Request> {
        (self.kind == TYPE_REQUEST)
            .then(|| ttrpc::proto::Request::parse_from_bytes(&self.payload).ok())
            .flatten()
    }

    /// A response frame carrying an error status for `stream_id`.
    pub fn error_response(stream_id: u32, code: ttrpc::Code, message: &str) -> Frame {
        let mut resp = ttrpc::proto::Response::new();
        resp.set_status(ttrpc::get_status(code, message));
        Frame {
            stream_id,
            kind: TYPE_RESPONSE,
            flags: 0,
            payload: resp.write_to_bytes().unwrap_or_default(),
        }
    }

    /// The answer to an oversized message, in ttrpc's own words (`RESOURCE_EXHAUSTED`).
    pub fn oversized_response(stream_id: u32, len: u32) -> Frame {
        Frame::error_response(
            stream_id,
            ttrpc::Code::RESOURCE_EXHAUSTED,
            &format!("message length {len} exceed maximum message size of {MAX_PAYLOAD}"),
        )
    }

    /// The status code of a response frame (`OK` when it has none).
    pub fn response_code(&self) -> Option<ttrpc::Code> {
        if self.kind != TYPE_RESPONSE {
            return None;
        }
        let resp = ttrpc::proto::Response::parse_from_bytes(&self.payload).ok()?;
        Some(
            resp.status
                .as_ref()
                .map(|s| s.code())
                .unwrap_or(ttrpc::Code::OK),
        )
    }
}

/// Reads exactly `len` bytes into a buffer that grows with what arrives (at most doubling,
/// never past `len`), so a peer that announces much and sends little holds little memory.
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(len.min(READ_CHUNK));
    while payload.len() < len {
        let want = len - payload.len();
        if payload.capacity() == payload.len() {
            payload.reserve_exact(want.min(payload.len().max(READ_CHUNK)));
        }
        // `take` keeps the read inside this frame; the spare capacity bounds it further.
        let n = (&mut *r).take(want as u64).read_buf(&mut payload).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(incoming: Option<Incoming>) -> Frame {
        match incoming {
            Some(Incoming::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_decode() {
        let mut req = ttrpc::proto::Request::new();
        req.service = "containerd.task.v2.Task".into();
        req.method = "Create".into();
        req.payload = vec![1, 2, 3];
        let f = Frame {
            stream_id: 7,
            kind: TYPE_REQUEST,
            flags: 0,
            payload: req.write_to_bytes().expect("encode"),
        };
        let mut buf = Vec::new();
        f.write(&mut buf).await.expect("write");
        let mut rd = &buf[..];
        let back = frame_of(Frame::read(&mut rd).await.expect("read"));
        assert_eq!(back.stream_id, 7);
        let r = back.request().expect("request");
        assert_eq!(
            (r.service.as_str(), r.method.as_str()),
            ("containerd.task.v2.Task", "Create")
        );
        assert!(Frame::read(&mut rd).await.expect("eof").is_none());
        let e = Frame::error_response(7, ttrpc::Code::FAILED_PRECONDITION, "no");
        assert_eq!(e.response_code(), Some(ttrpc::Code::FAILED_PRECONDITION));
        // A truncated header is an error, not a clean end.
        let mut short = &buf[..4];
        assert!(Frame::read(&mut short).await.is_err());
    }

    #[tokio::test]
    async fn an_oversized_frame_is_skipped_and_the_next_one_still_reads() {
        // 16 MiB + 1 of payload, then an ordinary frame on the same stream of bytes.
        let len = MAX_PAYLOAD + 1;
        let mut bytes = Vec::with_capacity(HEADER_LEN + len + 64);
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.extend_from_slice(&5u32.to_be_bytes());
        bytes.extend_from_slice(&[TYPE_REQUEST, 0]);
        bytes.resize(HEADER_LEN + len, 0xab);
        let next = Frame {
            stream_id: 7,
            kind: TYPE_REQUEST,
            flags: 0,
            payload: b"next".to_vec(),
        };
        next.write(&mut bytes).await.expect("write");
        let mut rd = &bytes[..];
        match Frame::read(&mut rd).await.expect("read") {
            Some(Incoming::Oversized(h)) => {
                assert_eq!(
                    (h.len as usize, h.stream_id, h.kind),
                    (len, 5, TYPE_REQUEST)
                )
            }
            other => panic!("expected the oversized header, got {other:?}"),
        }
        assert_eq!(frame_of(Frame::read(&mut rd).await.expect("read")), next);
        let answer = Frame::oversized_response(5, len as u32);
        assert_eq!(
            answer.response_code(),
            Some(ttrpc::Code::RESOURCE_EXHAUSTED)
        );
        // A huge announcement with nothing behind it ends the stream as an error.
        let mut huge = Vec::from(u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 6]);
        let e = Frame::read(&mut &huge[..]).await.expect_err("truncated");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_payload_buffer_grows_with_what_arrives() {
        // 16 MiB announced, 3 bytes sent: the buffer never reached the announced size.
        let mut bytes = Vec::from((MAX_PAYLOAD as u32).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 1, TYPE_REQUEST, 0, 1, 2, 3]);
        let e = Frame::read(&mut &bytes[..]).await.expect_err("truncated");
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut rd = &[9u8; 100][..];
        let got = read_payload(&mut rd, 100).await.expect("payload");
        assert_eq!((got.len(), got.capacity()), (100, 100));
    }
}

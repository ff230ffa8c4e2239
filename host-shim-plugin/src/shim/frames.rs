//! ttrpc framing, just enough to proxy opaquely: a 10-byte header (payload length u32 BE,
//! stream id u32 BE, type u8, flags u8) and the payload. Frames are forwarded byte for byte;
//! only the few requests CNFS intercepts are decoded (ttrpc's own `Request`/`Response`).

use protobuf::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER_LEN: usize = 10;
pub const TYPE_REQUEST: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;
/// ttrpc's default message limit is 4 MiB; anything larger is not ttrpc we should pass on.
const MAX_PAYLOAD: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Frame {
    pub stream_id: u32,
    pub kind: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Reads one frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
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
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(std::io::Error::other(format!(
                "ttrpc frame of {len} bytes is too large"
            )));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Some(Frame {
            stream_id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            kind: h[8],
            flags: h[9],
            payload,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let back = Frame::read(&mut rd).await.expect("read").expect("frame");
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
        // Oversized frames are refused.
        let mut huge = Vec::from((u32::MAX).to_be_bytes());
        huge.extend_from_slice(&[0; 6]);
        assert!(Frame::read(&mut &huge[..]).await.is_err());
    }
}

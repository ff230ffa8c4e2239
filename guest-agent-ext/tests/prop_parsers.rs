//! Property tests for what the agent parses from outside: mountinfo text (the kernel's, but
//! with caller-chosen paths in it), kernel log records, and the byte stream every connection
//! feeds the gate. Any input: no panic; the gate never passes a partial or oversized frame.

use std::collections::HashMap;

use cnfs_agent::gate::{BodyCheck, Gate, Limits, Screen, REFUSE_METHOD};
use cnfs_agent::{kmsg, mountinfo};
use proptest::prelude::*;
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn mountinfo_line() -> impl Strategy<Value = String> {
    (
        "[0-9]{1,4}",
        "/[ -~]{0,40}",
        "[a-z0-9]{1,8}",
        "[ -~]{0,40}",
        "[a-z0-9=,]{0,40}",
    )
        .prop_map(|(id, mp, ty, src, opts)| {
            format!("{id} 1 0:20 / {mp} rw shared:1 - {ty} {src} {opts}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn kmsg_regression_invalid_utf8_grows_in_bytes(_x in 0..1u8) {
        // Found by a CI run of the property below: [48, 59, 0, ...] is "0;" and was taken as a
        // record although a record header has three numbers.
        let data = [b'0', b';', 0xff, 0xff];
        prop_assert_eq!(kmsg::parse(&data).len(), 0, "a header of one field is not a record");
    }

    #[test]
    fn mountinfo_never_panics_on_any_text(text in "\\PC{0,400}") {
        let entries = mountinfo::parse(&text);
        for e in &entries {
            let _ = e.option("vers");
        }
    }

    #[test]
    fn mountinfo_lines_keep_their_fields(lines in proptest::collection::vec(mountinfo_line(), 0..8)) {
        let text = lines.join("\n");
        let entries = mountinfo::parse(&text);
        prop_assert!(entries.len() <= lines.len());
        for e in &entries {
            prop_assert!(!e.fs_type.contains(' '));
        }
    }

    #[test]
    fn kmsg_records_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        // (Invalid UTF-8 becomes U+FFFD, 3 bytes for 1: count characters, not bytes.)
        for m in kmsg::parse(&data) {
            prop_assert!(m.chars().count() <= data.len());
            prop_assert!(!m.contains('\n'));
        }
    }
}

fn screen() -> Screen {
    let mut methods: HashMap<String, BodyCheck> = HashMap::new();
    methods.insert("Ping".into(), |b| {
        cnfs_protocols::agent::PingRequest::parse_from_bytes(b)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    Screen {
        service: "cnfs.v1.Agent".into(),
        methods,
    }
}

/// Feeds `input` through a gate in `chunk`-sized writes; returns what ttrpc would read.
fn through(input: Vec<u8>, chunk: usize, max_frame: usize) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let limits = Limits {
            max_frame,
            ..Limits::default()
        };
        let gate = Gate::new(
            limits,
            screen(),
            slog::Logger::root(slog::Discard, slog::o!()),
        );
        let (mut client, server) = tokio::io::duplex(4096);
        let mut gated = gate.admit(server).expect("admitted");
        let writer = tokio::spawn(async move {
            for c in input.chunks(chunk.max(1)) {
                if client.write_all(c).await.is_err() {
                    return;
                }
            }
        });
        let mut out = Vec::new();
        let _ = gated.read_to_end(&mut out).await;
        let _ = writer.await;
        out
    })
}

/// Splits what the gate passed into whole frames; fails on a partial one.
fn frames(mut out: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut v = Vec::new();
    while !out.is_empty() {
        if out.len() < 10 {
            return Err(format!("{} bytes of a header", out.len()));
        }
        let len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
        if out.len() < 10 + len {
            return Ok(v); // the input itself ended mid-frame
        }
        v.push((out[8], out[10..10 + len].to_vec()));
        out = &out[10 + len..];
    }
    Ok(v)
}

fn frame(kind: u8, stream: u32, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(&[kind, 0]);
    f.extend_from_slice(body);
    f
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn the_gate_passes_only_whole_bounded_frames_for_any_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        chunk in 1usize..700,
    ) {
        let out = through(data, chunk, 512);
        let fs = frames(&out).map_err(TestCaseError::fail)?;
        for (_, body) in fs {
            prop_assert!(body.len() <= 512 + 200, "a frame of {} bytes passed", body.len());
        }
    }

    #[test]
    fn every_request_frame_passes_or_becomes_a_refusal(
        bodies in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                Just(ttrpc::proto::Request {
                    service: "cnfs.v1.Agent".into(),
                    method: "Ping".into(),
                    ..Default::default()
                }.write_to_bytes().expect("encode")),
                proptest::collection::vec(any::<u8>(), 600..1200),
            ],
            1..12,
        ),
        chunk in 1usize..300,
    ) {
        let mut input = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            input.extend(frame(1, 2 * i as u32 + 1, b));
        }
        let n = bodies.len();
        let fs = frames(&through(input, chunk, 512)).map_err(TestCaseError::fail)?;
        // One request in, one request out: passed as is, or rewritten into a refusal.
        prop_assert_eq!(fs.len(), n);
        for (kind, body) in fs {
            prop_assert_eq!(kind, 1);
            let req = ttrpc::proto::Request::parse_from_bytes(&body)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(req.method == "Ping" || req.method == REFUSE_METHOD, "{}", req.method);
        }
    }
}

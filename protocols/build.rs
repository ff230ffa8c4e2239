// Generates the protobuf messages and the async ttrpc client/server from proto/agent.proto
// at build time, in pure Rust (no protoc needed).
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc codegen of proto/agent.proto");

    // The generated files open with inner attributes (`#![allow(..)]`, `//!`), which
    // `include!` cannot take inside a module; the module in lib.rs carries the allows instead.
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(file);
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewrite generated file");
    }
}

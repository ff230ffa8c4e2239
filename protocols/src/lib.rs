//! CNFS protocol crate: the generated ttrpc service for the guest agent, the validated
//! volume spec both sides share, and the host-side transport that reaches the agent.

/// Generated protobuf messages (from `proto/agent.proto`; never edited by hand).
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    dead_code,
    missing_docs,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated async ttrpc client and server for the `cnfs.v1.Agent` service.
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    dead_code,
    missing_docs,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod handoff;
pub mod keyed_lock;
pub mod modules_dep;
pub mod pidfd;
pub mod spec;
pub mod transport;
pub mod volume_url;

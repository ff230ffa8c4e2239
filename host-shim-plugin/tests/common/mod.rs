//! What the shim's containerd suites share.

use std::path::{Path, PathBuf};

/// containerd finds `containerd-shim-cnfs-v2` on its PATH; put the built binary there.
pub fn shim_on_path() {
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-cnfs-v2"));
    let dir = shim.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| Path::new(p) == dir) {
        std::env::set_var("PATH", format!("{}:{path}", dir.display()));
    }
}

/// Command output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

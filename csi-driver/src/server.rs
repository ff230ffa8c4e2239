//! Serving gRPC on the CSI unix socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::time::Instant;

use anyhow::Context;
use slog::{info, warn, Logger};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Response, Status};

/// `unix:///csi/csi.sock` or a plain path → the socket path.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    anyhow::ensure!(
        path.starts_with('/'),
        "--endpoint: {endpoint:?} must be unix:///absolute/path or an absolute path"
    );
    Ok(PathBuf::from(path))
}

/// Binds the socket (replacing a stale one, never another kind of file), owner-only.
pub fn bind(path: &Path) -> anyhow::Result<UnixListenerStream> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(UnixListenerStream::new(listener))
}

/// Resolves when the process is asked to stop (SIGTERM from the kubelet, or SIGINT).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs one call (method, volume, outcome, duration; never a secrets map) and answers it.
/// The volume is caller text: a long one is logged in bounded form (the error message is
/// already bounded where it is made).
pub fn logged<T>(
    log: &Logger,
    method: &str,
    volume: &str,
    start: Instant,
    r: Result<T, Status>,
) -> Result<Response<T>, Status> {
    let ms = start.elapsed().as_millis() as u64;
    let volume = crate::bounds::log_value(volume).into_owned();
    match &r {
        Ok(_) => info!(log, "request"; "method" => method, "volume" => volume, "code" => "OK",
            "duration_ms" => ms),
        Err(s) => warn!(log, "request failed"; "method" => method, "volume" => volume,
            "code" => format!("{:?}", s.code()), "error" => s.message(), "duration_ms" => ms),
    }
    r.map(Response::new)
}

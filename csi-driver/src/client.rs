//! A CSI client over the plugin's unix socket (tests, operator tools).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the CSI socket at `path`.
pub async fn connect(path: impl Into<PathBuf>) -> anyhow::Result<Channel> {
    let path = path.into();
    // The URI is required by tonic and ignored by the connector.
    let channel = Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(channel)
}

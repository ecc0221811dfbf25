//! A gRPC client for the provider socket, dialled the way the driver does it:
//! insecure HTTP/2 over the Unix socket with `:authority` = `localhost`.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::proto::csi_driver_provider_client::CsiDriverProviderClient;

/// The driver's default gRPC receive limit.
pub const DRIVER_RECEIVE_LIMIT: usize = 4 * 1024 * 1024;

pub type ProviderClient = CsiDriverProviderClient<Channel>;

/// Connects to the provider socket at `socket`.
pub async fn connect(socket: &Path) -> Result<ProviderClient, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(CsiDriverProviderClient::new(channel).max_decoding_message_size(DRIVER_RECEIVE_LIMIT))
}

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

/// Why connecting to `socket` failed, in words a person can act on (the
/// transport's own error says only "transport error").
pub fn explain_connect_error(socket: &Path, e: &tonic::transport::Error) -> String {
    let mut source = std::error::Error::source(e);
    let mut io = None;
    while let Some(s) = source {
        if let Some(i) = s.downcast_ref::<std::io::Error>() {
            io = Some(i.kind());
        }
        source = s.source();
    }
    let shown = socket.display();
    match io {
        Some(std::io::ErrorKind::NotFound) => format!(
            "nothing listens at {shown}: start the daemon (`coffer serve --socket {shown}`), \
             or point --socket at the socket it listens on"
        ),
        Some(std::io::ErrorKind::ConnectionRefused) => format!(
            "{shown} exists but no daemon answers on it (a socket left by a stopped daemon?): \
             start `coffer serve --socket {shown}`"
        ),
        Some(std::io::ErrorKind::PermissionDenied) => format!(
            "permission denied on {shown}: the provider socket is root's (as the driver runs); \
             run as root, or start a daemon with --socket at a path you can use (and \
             --allowed-uids for your uid)"
        ),
        _ => format!("cannot connect to {shown}: {e}"),
    }
}

//! The local control API: a Unix socket in the store directory (`control.sock`, mode 0600)
//! through which the `bids image …` commands talk to the node that owns the store. One JSON
//! request per line; replies are JSON lines (a fetch streams progress until it ends).

use crate::engine::{FetchProgress, NodeHandle, NodeStatus};
use crate::versions::{self, NewVersion};
use bids_protocols::gis::ImageQuery;
use bids_protocols::{ImageId, ImageRef, ObjectKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

pub const SOCKET_NAME: &str = "control.sock";
const MAX_LINE: u64 = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    Fetch {
        image: ImageRef,
    },
    Add {
        file: PathBuf,
        image: ImageRef,
        chunk_size: u32,
        base: Option<ImageRef>,
    },
    Export {
        image: ImageRef,
        out: PathBuf,
    },
    Remove {
        image: ImageRef,
    },
    /// Re-hash every chunk of `image`; with `repair`, fetch the bad ones again
    /// (`crate::repair`).
    Verify {
        image: ImageRef,
        repair: bool,
    },
    /// Import `file` as `image`, a new version of `from` (held here), build and import the
    /// delta `from` → `image`, publish both (`crate::versions::publish`). `chunk_size` 0
    /// takes `from`'s.
    Publish {
        file: PathBuf,
        image: ImageRef,
        from: ImageRef,
        chunk_size: u32,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Status(Box<NodeStatus>),
    Progress(FetchProgress),
    Added {
        id: ImageId,
        image: ImageRef,
        size: u64,
        chunks: u32,
    },
    Done,
    Published(Box<NewVersion>),
    Verified(Box<crate::repair::VerifyReport>),
    Error(String),
}

pub fn socket_path(store_dir: &Path) -> PathBuf {
    store_dir.join(SOCKET_NAME)
}

/// Serves the control socket until the node stops.
pub async fn serve(node: NodeHandle) -> std::io::Result<()> {
    let path = socket_path(node.store().dir());
    if path.exists() {
        // A socket left by a node that died: nobody answers on it.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another node already serves {}", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "control socket ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(node, stream).await {
                debug!(error = %e, "control connection ended with an error");
            }
        });
    }
}

async fn write_reply(
    w: &mut (impl AsyncWriteExt + Unpin),
    r: &ControlReply,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(node: NodeHandle, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r.take(MAX_LINE));
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        // A client that connects and closes without a request: `node_running` probes so.
        debug!("control connection closed without a request");
        return Ok(());
    }
    let req: ControlRequest = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "malformed control request");
            return write_reply(
                &mut w,
                &ControlReply::Error(format!("malformed request: {e}")),
            )
            .await;
        }
    };
    match req {
        ControlRequest::Status => match node.status().await {
            Ok(s) => write_reply(&mut w, &ControlReply::Status(Box::new(s))).await,
            Err(e) => write_reply(&mut w, &ControlReply::Error(e)).await,
        },
        ControlRequest::Fetch { image } => {
            // The cheapest path: deltas from a held version when they move fewer bytes.
            let mut rx = match versions::fetch(&node, ImageQuery::Ref(image)).await {
                Ok(rx) => rx,
                Err(e) => return write_reply(&mut w, &ControlReply::Error(e)).await,
            };
            loop {
                let p = rx.borrow_and_update().clone();
                let done = p.done.is_some();
                write_reply(&mut w, &ControlReply::Progress(p)).await?;
                if done {
                    return Ok(());
                }
                if rx.changed().await.is_err() {
                    return write_reply(&mut w, &ControlReply::Error("node stopped".into())).await;
                }
                // Progress lines at most every 100 ms.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        ControlRequest::Add {
            file,
            image,
            chunk_size,
            base,
        } => {
            let store = node.store().clone();
            let res = tokio::task::spawn_blocking(move || {
                store.import(
                    &file,
                    &image,
                    chunk_size,
                    base,
                    ObjectKind::Image,
                    &mut |_, _| {},
                )
            })
            .await
            .map_err(std::io::Error::other)?;
            match res {
                Ok(m) => {
                    let id = m.id();
                    let _ = node.imported(id).await;
                    write_reply(
                        &mut w,
                        &ControlReply::Added {
                            id,
                            image: m.image_ref(),
                            size: m.size,
                            chunks: m.chunk_count(),
                        },
                    )
                    .await
                }
                Err(e) => write_reply(&mut w, &ControlReply::Error(e.to_string())).await,
            }
        }
        ControlRequest::Export { image, out } => {
            let store = node.store().clone();
            // Whole, or rebuilt from a held base and delta files.
            let res =
                tokio::task::spawn_blocking(move || crate::versions::export(&store, &image, &out))
                    .await
                    .map_err(std::io::Error::other)?;
            match res {
                Ok(_) => write_reply(&mut w, &ControlReply::Done).await,
                Err(e) => write_reply(&mut w, &ControlReply::Error(e.to_string())).await,
            }
        }
        ControlRequest::Publish {
            file,
            image,
            from,
            chunk_size,
        } => match versions::publish(&node, file, image, from, chunk_size).await {
            Ok(nv) => write_reply(&mut w, &ControlReply::Published(Box::new(nv))).await,
            Err(e) => write_reply(&mut w, &ControlReply::Error(e.to_string())).await,
        },
        ControlRequest::Verify { image, repair } => {
            match crate::repair::verify(&node, &image, repair).await {
                Ok(r) => write_reply(&mut w, &ControlReply::Verified(Box::new(r))).await,
                Err(e) => write_reply(&mut w, &ControlReply::Error(e)).await,
            }
        }
        ControlRequest::Remove { image } => {
            let store = node.store().clone();
            let Some(id) = store.resolve(&image) else {
                return write_reply(
                    &mut w,
                    &ControlReply::Error(format!("image {image} is not in this store")),
                )
                .await;
            };
            let res = tokio::task::spawn_blocking(move || store.remove(&id))
                .await
                .map_err(std::io::Error::other)?;
            match res {
                Ok(()) => {
                    let _ = node.removed(id).await;
                    write_reply(&mut w, &ControlReply::Done).await
                }
                Err(e) => write_reply(&mut w, &ControlReply::Error(e.to_string())).await,
            }
        }
    }
}

/// Client side, for the CLI: sends one request and calls `on_reply` for every reply line.
pub async fn request(
    store_dir: &Path,
    req: &ControlRequest,
    mut on_reply: impl FnMut(ControlReply),
) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket_path(store_dir)).await?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        let reply: ControlReply = serde_json::from_str(&l).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad reply from node: {e}"),
            )
        })?;
        on_reply(reply);
    }
    Ok(())
}

/// True if a node answers on the store's control socket.
pub async fn node_running(store_dir: &Path) -> bool {
    UnixStream::connect(socket_path(store_dir)).await.is_ok()
}

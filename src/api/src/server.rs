//! The API thread: a current-thread tokio runtime serving HTTP/1.1 connections with hyper.

use crate::parse::{parse_request, MAX_BODY};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vmm::controller::{VmmAction, VmmData, VmmResult};
use vmm_sys_util::eventfd::EventFd;

/// How long a client may take to send its request headers before the connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors creating the API socket.
#[derive(Debug, Error)]
pub enum BindError {
    /// Another process is serving on the path.
    #[error("API socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Creating or binding failed.
    #[error("cannot create API socket {path}: {err}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
}

/// A request and where its answer goes.
pub type Envelope = (VmmAction, Sender<VmmResult>);

/// The running API server. Dropping it removes the socket file.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bind(path: &Path) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_owned()));
        }
        // Nobody answers: a stale socket from a process that died.
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|err| BindError::Bind {
        path: path.to_owned(),
        err,
    })
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn fault(msg: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "fault_message": msg }).to_string(),
    )
}

struct Shared {
    to_vmm: std::sync::Mutex<Sender<Envelope>>,
    notify: EventFd,
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return fault(&format!(
                "{method} {path}: the request body is larger than {MAX_BODY} bytes or broken"
            ))
        }
    };
    let action = match parse_request(&method, &path, &body) {
        Ok(a) => a,
        Err(msg) => {
            tracing::info!("API: {msg}");
            return fault(&msg);
        }
    };
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    let sent = shared
        .to_vmm
        .lock()
        .map(|tx| tx.send((action, reply_tx)).is_ok())
        .unwrap_or(false);
    if !sent {
        return fault("the VMM is shutting down");
    }
    let _ = shared.notify.write(1);
    // The VMM answers from its own thread; wait for it off the runtime's thread.
    let answer = tokio::task::spawn_blocking(move || reply_rx.recv()).await;
    match answer {
        Ok(Ok(Ok(VmmData::Empty))) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(Ok(Ok(VmmData::Json(v)))) => json_response(StatusCode::OK, v.to_string()),
        Ok(Ok(Err(e))) => {
            tracing::info!("API: {method} {path}: {e}");
            fault(&e.to_string())
        }
        _ => fault("the VMM did not answer"),
    }
}

impl ApiServer {
    /// Binds `path` (refusing a live socket, replacing a stale one) and serves it on a new
    /// thread. Requests go to `to_vmm`; `notify` is signalled after each.
    pub fn start(
        path: &Path,
        to_vmm: Sender<Envelope>,
        notify: EventFd,
    ) -> Result<Self, BindError> {
        let listener = bind(path)?;
        listener
            .set_nonblocking(true)
            .map_err(|err| BindError::Bind {
                path: path.to_owned(),
                err,
            })?;
        let shared = Arc::new(Shared {
            to_vmm: std::sync::Mutex::new(to_vmm),
            notify,
        });
        let err_path = path.to_owned();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .max_blocking_threads(4)
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("API: cannot start the runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("API: cannot serve {}: {e}", err_path.display());
                            return;
                        }
                    };
                    loop {
                        let stream = match listener.accept().await {
                            Ok((s, _)) => s,
                            Err(e) => {
                                tracing::warn!("API: accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let shared = shared.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(handle(req, shared).await)
                                }
                            });
                            if let Err(e) = hyper::server::conn::http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(HEADER_TIMEOUT)
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                            {
                                tracing::debug!("API: connection ended: {e}");
                            }
                        });
                    }
                });
            })
            .map_err(|err| BindError::Bind {
                path: path.to_owned(),
                err,
            })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

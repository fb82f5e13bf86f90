//! The API thread: a current-thread tokio runtime serving HTTP/1.1 connections with hyper.

use crate::parse::parse_request;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmm::controller::{VmmAction, VmmData, VmmResult};
use vmm_sys_util::eventfd::EventFd;

/// What the API thread calls once it serves clients: accepting on the bound socket, reading
/// requests and writing answers, the runtime's event loop and timers, handing requests to the
/// VMM thread (an eventfd write) and the helper threads that wait for its answers.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "the API server",
    syscalls: &[
        libc::SYS_accept4,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_readv,
        libc::SYS_sendto,
        libc::SYS_writev,
        libc::SYS_shutdown,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_fcntl,
        libc::SYS_getsockopt,
    ],
    with_arg: &[utils::seccomp::libc_ioctl(libc::FIONBIO)],
};

/// How long a client may take to send its request headers before the connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client may take to send a request body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an answer may wait for a client that does not read it before the connection is
/// dropped (a client that pipelines requests and never reads would otherwise hold its
/// connection slot for ever).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once, as in Firecracker; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 10;
/// Firecracker's default for `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 50 * 1024;

/// Errors creating the API socket.
#[derive(Debug, Error)]
#[error("API socket {}: {reason}", .path.display())]
pub struct BindError {
    /// The path.
    pub path: PathBuf,
    /// Why it could not be served.
    pub reason: utils::unix_socket::BindError,
}

/// A request and where its answer goes.
pub type Envelope = (VmmAction, Sender<VmmResult>);

/// Called once for every request the API thread answers itself with an error (bad HTTP,
/// bad JSON, unknown path, too many connections), so that the metrics count every request.
pub type RejectHook = Arc<dyn Fn() + Send + Sync>;

/// How the server behaves; [`Default`] is Firecracker's behaviour.
#[derive(Clone)]
pub struct ServerOptions {
    /// Largest request body accepted (`--http-api-max-payload-size`).
    pub max_payload: usize,
    /// Counts requests rejected before they reach the VMM.
    pub on_reject: RejectHook,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            on_reject: Arc::new(|| {}),
        }
    }
}

/// The running API server. Dropping it removes the socket file, if it is still the one this
/// server created.
pub struct ApiServer {
    _path: utils::unix_socket::OwnedPath,
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

fn fault_body(msg: &str) -> String {
    serde_json::json!({ "fault_message": msg }).to_string()
}

fn fault_with(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json_response(status, fault_body(msg))
}

fn fault(msg: &str) -> Response<Full<Bytes>> {
    fault_with(StatusCode::BAD_REQUEST, msg)
}

/// A whole response written without hyper, for connections that hyper never serves.
fn raw_response(status: &str, msg: &str) -> Vec<u8> {
    let body = fault_body(msg);
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Shared {
    to_vmm: std::sync::Mutex<Sender<Envelope>>,
    notify: EventFd,
    options: ServerOptions,
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let max = shared.options.max_payload;
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), max).collect()).await;
    let body = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            (shared.options.on_reject)();
            return fault(&format!(
                "{method} {path}: the request body is larger than {max} bytes, or broken"
            ));
        }
        Err(_) => {
            (shared.options.on_reject)();
            return fault_with(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "{method} {path}: the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        }
    };
    let action = match parse_request(&method, &path, &body) {
        Ok(a) => a,
        Err(msg) => {
            (shared.options.on_reject)();
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

/// The connection as hyper sees it. hyper answers requests it cannot parse on its own, with a
/// status and an empty body; this puts the `fault_message` body every API error carries into
/// those answers (vireo's own error responses always have a body, so an empty 4xx is hyper's).
struct FaultBodies<S> {
    inner: S,
    /// A replacement response still being written: bytes and how many are out.
    pending: Option<(Vec<u8>, usize)>,
    on_reject: RejectHook,
    /// Set while a write waits for the client to read.
    write_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncWrite + Unpin> FaultBodies<S> {
    fn new(inner: S, on_reject: RejectHook) -> Self {
        Self {
            inner,
            pending: None,
            on_reject,
            write_deadline: None,
        }
    }

    /// Fails a write that has waited [`WRITE_TIMEOUT`] for the client to make room.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.write_deadline = None;
            return r;
        }
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        if deadline.as_mut().poll(cx).is_ready() {
            self.write_deadline = None;
            utils::warn_limited!(
                "api_client_not_reading",
                "API: a client did not read its answer within {} s; connection dropped",
                WRITE_TIMEOUT.as_secs()
            );
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        Poll::Pending
    }

    fn replacement(buf: &[u8]) -> Option<Vec<u8>> {
        let head = std::str::from_utf8(buf).ok()?;
        let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?;
        if !(status.starts_with('4') || status.starts_with('5'))
            || !head.ends_with("\r\n\r\n")
            || !head
                .to_ascii_lowercase()
                .contains("\r\ncontent-length: 0\r\n")
        {
            return None;
        }
        let msg = match status {
            "414" => "the request URI is too long",
            "431" => "the request headers are too large",
            _ => "malformed HTTP/1.1 request: bad request line, method, URI (it must be UTF-8), HTTP version, or header (such as Content-Length), or bytes left over after a request's body",
        };
        Some(raw_response("400 Bad Request", msg))
    }

    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            if *done == bytes.len() {
                self.pending = None;
                break;
            }
            let r = Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]);
            let n = ready!(self.bounded(cx, r))?;
            let Some((_, done)) = &mut self.pending else {
                break;
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FaultBodies<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FaultBodies<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(bytes) = Self::replacement(buf) {
            (self.on_reject)();
            self.pending = Some((bytes, 0));
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Releases a connection slot when the connection ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, most likely: wait for connections to close.
                utils::warn_limited!("api_accept_failed", "API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            (shared.options.on_reject)();
            utils::warn_limited!(
                "api_too_many_connections",
                "API: more than {MAX_CONNECTIONS} connections at once; answered 503"
            );
            let answer = raw_response(
                "503 Service Unavailable",
                &format!("too many open connections (at most {MAX_CONNECTIONS})"),
            );
            // A fresh socket's buffer takes the whole answer; never wait on this client.
            let _ = stream.try_write(&answer);
            continue;
        }
        let slot = Slot(open.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let io = FaultBodies::new(stream, shared.options.on_reject.clone());
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, shared).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                // Clients that shut down their sending side after the request (socat, nc -N)
                // still get the answer.
                .half_close(true)
                // One contiguous write per response, so FaultBodies sees whole heads.
                .writev(false)
                .serve_connection(TokioIo::new(io), service)
                .await
            {
                tracing::debug!("API: connection ended: {e}");
            }
        });
    }
}

impl ApiServer {
    /// Binds `path` (refusing a live socket, replacing a stale one) and serves it on a new
    /// thread. Requests go to `to_vmm`; `notify` is signalled after each.
    pub fn start(
        path: &Path,
        to_vmm: Sender<Envelope>,
        notify: EventFd,
        options: ServerOptions,
    ) -> Result<Self, BindError> {
        let bind_err = |reason| BindError {
            path: path.to_owned(),
            reason,
        };
        let (listener, owned) = utils::unix_socket::bind(path).map_err(bind_err)?;
        let server = Self { _path: owned };
        let shared = Arc::new(Shared {
            to_vmm: std::sync::Mutex::new(to_vmm),
            notify,
            options,
        });
        let err_path = path.to_owned();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .max_blocking_threads(MAX_CONNECTIONS)
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("API: cannot start the runtime: {e}");
                        return;
                    }
                };
                // Confined before the first client is accepted.
                utils::seccomp::filter(utils::seccomp::ThreadKind::Api).install();
                rt.block_on(async move {
                    match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => serve(l, shared).await,
                        Err(e) => tracing::error!("API: cannot serve {}: {e}", err_path.display()),
                    }
                });
            })
            .map_err(|e| bind_err(utils::unix_socket::BindError::Io(e)))?;
        Ok(server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodiless_error_heads_are_replaced() {
        type F = FaultBodies<tokio::net::UnixStream>;
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let r = String::from_utf8(F::replacement(hyper_400).unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["fault_message"].as_str().unwrap().contains("malformed"));
        assert!(r.contains(&format!("Content-Length: {}\r\n", body.len())));
        // vireo's own answers: 204 without a body, 400 with one.
        assert!(F::replacement(b"HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n").is_none());
        assert!(F::replacement(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n"
        )
        .is_none());
    }
}

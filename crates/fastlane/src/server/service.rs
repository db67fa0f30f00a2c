//! The per-connection service hyper calls for each request (fastlane's own
//! endpoints, then the app's router), and the response future and body that
//! keep a request counted as in flight for the connection's idle watch
//! until its response is done.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::Router;
use futures_util::future::Either;
use hyper::body::Incoming;
use tower::Service;

use super::internal::internal_endpoint;
use super::proxy::OverTls;
use super::ServerState;
use crate::executor::reactor::IdleWatch;

/// What hyper calls for each request of a connection: fastlane's own
/// endpoints, then the app's router.
///
/// Holds its own handle of the router, so a request clones nothing shared
/// between threads (`Router::call` wants `&mut`, hyper gives `&`: the
/// `RefCell` is borrowed only while the router builds the response future).
pub(super) struct ConnectionService {
    router: RefCell<Router>,
    state: Arc<ServerState>,
    /// Tells the connection's idle watch (the header-read timeout) when
    /// requests are in flight.
    watch: IdleWatch,
    /// The watch needs HTTP/1 requests too (on the runners' reactor, which
    /// enforces the HTTP/1 deadline itself); on tokio's I/O hyper does, and
    /// only HTTP/2 streams are counted.
    watch_http1: bool,
    /// The socket's peer, given to each request as axum's
    /// `ConnectInfo<SocketAddr>`, and with the proxy headers as
    /// [`ClientInfo`](crate::ClientInfo) (an ASGI app's `client`).
    peer: SocketAddr,
    /// The connection is HTTPS (the scheme unless a trusted proxy says).
    https: bool,
}

impl ConnectionService {
    pub(super) fn new(
        router: Router,
        state: &Arc<ServerState>,
        watch: IdleWatch,
        watch_http1: bool,
        peer: SocketAddr,
    ) -> Self {
        Self { router: RefCell::new(router), state: state.clone(), watch, watch_http1, peer, https: false }
    }

    /// Whether the route layer is the outermost layer of the router, so that
    /// nothing changes an answer's headers after it (see
    /// [`offer_head`](crate::request_id::offer_head)): compression, when on,
    /// is outside it (it times the handler's answer, not the compression).
    pub(super) fn route_layer_outermost(&self) -> bool {
        !self.state.config.compression
    }

    /// The same service for a connection over TLS.
    pub(super) fn over_tls(mut self) -> Self {
        self.https = true;
        self
    }
}

impl hyper::service::Service<http::Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = Served;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        self.serve(req)
    }
}

impl ConnectionService {
    /// A request of this connection, read by hyper or by fastlane's own
    /// HTTP/1 (`http1.rs`).
    pub(super) fn serve<B>(&self, mut req: http::Request<B>) -> Served
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        // The route layer (`middleware.rs`) works out the `ClientInfo` from these.
        if self.https {
            req.extensions_mut().insert(OverTls);
        }
        req.extensions_mut().insert(axum::extract::ConnectInfo(self.peer));
        let watched = self.watch_http1 || req.version() == http::Version::HTTP_2;
        let busy = watched.then(|| Busy::new(&self.watch, req.method() == http::Method::CONNECT));
        let inner = match internal_endpoint(&self.state, &req) {
            Some(response) => Either::Left(std::future::ready(Ok(response))),
            // `Router` is always ready (its `poll_ready` returns `Ready` at once).
            None => Either::Right(self.router.borrow_mut().call(req)),
        };
        Served { inner, busy }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ConnectionService`]: the request counts as in
    /// flight for the idle watch until its response is done.
    pub(super) struct Served {
        #[pin]
        inner: Either<std::future::Ready<Result<Response, Infallible>>, RouteFuture<Infallible>>,
        busy: Option<Busy>,
    }
}

impl Future for Served {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let Some(busy) = this.busy.take() else { return std::task::Poll::Ready(Ok(response)) };
        let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS
            || (busy.connect && response.status().is_success());
        if upgraded {
            // The connection is the app's from here on.
            busy.watch.exempt();
        }
        // A body of known size is written at once (if the socket is full,
        // the reactor sees the write blocked); a stream may go on for long,
        // and the request stays in flight until it ends.
        if http_body::Body::size_hint(response.body()).exact().is_some() {
            return std::task::Poll::Ready(Ok(response));
        }
        Ok(response.map(|body| Body::new(BusyBody { inner: body, busy: Some(busy) }))).into()
    }
}

/// A request in flight on a watched connection, until dropped.
struct Busy {
    watch: IdleWatch,
    connect: bool,
}

impl Busy {
    fn new(watch: &IdleWatch, connect: bool) -> Self {
        watch.request_started();
        Self { watch: watch.clone(), connect }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.watch.request_done();
    }
}

pin_project_lite::pin_project! {
    /// A streaming response body, holding its request in flight until it ends.
    struct BusyBody {
        #[pin]
        inner: Body,
        busy: Option<Busy>,
    }
}

impl http_body::Body for BusyBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &polled {
            this.busy.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

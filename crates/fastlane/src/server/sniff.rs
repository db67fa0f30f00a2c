//! Connections on tokio's I/O (`--no-isolation`): the HTTP/2 deadlines that
//! the runners' reactor applies to its own connections (see
//! `executor::reactor`), applied by the connection's task instead.
//!
//! hyper enforces the header-read timeout of HTTP/1 connections itself, on a
//! coarse timer of ours; for HTTP/2 it has none. [`Sniffing`] follows the
//! client's bytes with the same frame scanner as the reactor, and
//! [`Deadlines`] checks the same rules every quarter of the timeout while
//! the connection speaks HTTP/2: a preface, frame header or header block not
//! whole within the timeout cuts the connection; no stream open for it asks
//! for GOAWAY. (HTTP/2 streams run as tasks of their own, so the connection's
//! task cannot learn of every change when it happens: it looks instead.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::executor::frames::FrameScanner;
use crate::executor::reactor::{IdleWatch, Verdict};

/// A TCP stream (or the TLS stream over one) whose incoming bytes are
/// followed for HTTP/2 frames; hyper reads it through hyper-util's
/// `TokioIo`, like any tokio stream.
#[derive(Debug)]
pub(crate) struct Sniffing<S = TcpStream> {
    stream: S,
    /// `None` once the connection is known not to be HTTP/2.
    scanner: Option<FrameScanner>,
    watch: IdleWatch,
}

impl<S> Sniffing<S> {
    pub(crate) fn new(stream: S, watch: IdleWatch) -> TokioIo<Self> {
        TokioIo::new(Self { stream, scanner: Some(FrameScanner::default()), watch })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffing<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        this.watch.follow(&mut this.scanner, &buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffing<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.watch.wrote(Pin::new(&mut this.stream).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.watch.wrote(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The HTTP/2 deadlines of one connection on tokio's I/O.
#[derive(Debug)]
pub(crate) struct Deadlines {
    watch: IdleWatch,
    timeout: Duration,
    check: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What [`Deadlines::poll`] asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing (yet).
    Wait,
    /// Send GOAWAY: no stream open for the timeout.
    CloseGracefully,
    /// Drop the connection: the client owes a preface, frame header or
    /// header block for longer than the timeout, or did not close when asked.
    Cut,
}

impl Deadlines {
    pub(crate) fn new(watch: IdleWatch, timeout: Duration) -> Self {
        // The watch's times are the coarse clock's, which the runners'
        // monitor ticks when isolation is on; here the timer's sweeper does.
        super::timer::start_sweeper();
        Self { watch, timeout, check: None }
    }

    /// How often the rules are checked: a quarter of the timeout (at least
    /// a tenth of a second), so a deadline is enforced within 1.25 times it.
    fn period(&self) -> Duration {
        (self.timeout / 4).max(Duration::from_millis(100))
    }

    /// Checks the rules when due, while the connection speaks HTTP/2; arms
    /// the task's wake-up for the next check.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Action {
        if !self.watch.is_http2() {
            return Action::Wait;
        }
        let period = self.period();
        let check = self.check.get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
        if check.as_mut().poll(cx).is_pending() {
            return Action::Wait;
        }
        crate::coarse::tick();
        let action = match self.watch.judge(self.timeout) {
            Verdict::Keep => Action::Wait,
            Verdict::AskToClose => Action::CloseGracefully,
            Verdict::Cut => Action::Cut,
        };
        check.as_mut().reset(tokio::time::Instant::now() + period);
        // Registers the waker for the next check.
        let _ = check.as_mut().poll(cx);
        action
    }
}

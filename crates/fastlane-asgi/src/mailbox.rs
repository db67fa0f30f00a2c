//! A request's mailbox: the worker's reader task puts the events of one
//! request in ([`Event`]: what the worker said about it), the request's own
//! task takes them out.
//!
//! One lock and a small queue per request, instead of a channel: tokio's
//! unbounded channel allocates a block of 32 slots when it is made, and a
//! request of a hello-world app receives two events.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

/// What the worker said about one request, for the request's own task.
#[derive(Debug)]
pub(crate) enum Event {
    /// `http.response.start` (the marshal payload, decoded by the receiver).
    Start(Bytes),
    /// Response body; more follows when the flag is set.
    Chunk(Bytes, bool),
    /// The app wants more request body.
    WantBody,
    /// The app failed after starting its response.
    Reset,
    /// Taken back before it started (its worker's loop blocked): send it
    /// to another worker.
    Revoked,
    /// The app accepted a WebSocket (the marshal payload).
    WsAccept(Bytes),
    /// The app closed (or, before accepting, denied) a WebSocket.
    WsClose(Bytes),
    /// A message for the client: text (UTF-8) or binary.
    WsMessage(Bytes, bool),
    /// The app took this many more messages.
    WsTaken(u32),
    /// The worker went away.
    Lost,
}

/// The events of one request, in order.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    events: VecDeque<Event>,
    waker: Option<Waker>,
    /// No more events will come (the request is done on the worker).
    closed: bool,
}

impl Mailbox {
    /// Adds an event and wakes the request's task.
    pub(crate) fn put(&self, event: Event) {
        let waker = {
            let mut inner = self.inner.lock().expect("mailbox lock");
            if inner.closed {
                return;
            }
            inner.events.push_back(event);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// No more events: a task waiting for one gets `None`.
    pub(crate) fn close(&self) {
        let waker = {
            let mut inner = self.inner.lock().expect("mailbox lock");
            inner.closed = true;
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The next event, if one is there.
    pub(crate) fn try_take(&self) -> Option<Event> {
        self.inner.lock().expect("mailbox lock").events.pop_front()
    }

    /// The next event, or `None` once closed and empty.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut inner = self.inner.lock().expect("mailbox lock");
        if let Some(event) = inner.events.pop_front() {
            return Poll::Ready(Some(event));
        }
        if inner.closed {
            return Poll::Ready(None);
        }
        match &inner.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => inner.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Waits for the next event.
    pub(crate) async fn take(&self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_take(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_come_out_in_order_and_close_ends_them() {
        let mailbox = std::sync::Arc::new(Mailbox::default());
        let taker = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(event) = mailbox.take().await {
                    seen.push(matches!(event, Event::WantBody));
                }
                seen
            })
        };
        mailbox.put(Event::WantBody);
        mailbox.put(Event::Reset);
        tokio::task::yield_now().await;
        mailbox.put(Event::WantBody);
        mailbox.close();
        mailbox.put(Event::Reset); // after close: dropped
        assert_eq!(taker.await.unwrap(), vec![true, false, true]);
    }
}

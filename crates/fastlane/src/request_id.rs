//! [`RequestId`]: the id that follows a request through its logs.
//!
//! Taken from the request when the client (or a proxy in front) sent one
//! that is well-formed: `X-Request-Id` first, then the trace id of a W3C
//! `traceparent`; made here otherwise. It goes back in the response's
//! `x-request-id`, is a field of the request's access log line, and names the
//! `request` span every log event of the handler is written under.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use http::HeaderMap;

/// The response header (and the request header read first).
pub(crate) const HEADER: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The target of the `request{id}` span ([`RequestId::span`]), by which
/// `init_logging`'s text lines turn it off (see `telemetry/line.rs`).
pub(crate) const SPAN_TARGET: &str = "fastlane::request_span";

/// The longest `X-Request-Id` taken as it is (a UUID is 36, a trace id 32).
const MAX_LEN: usize = 128;

/// A request's id: the client's `X-Request-Id` or `traceparent` trace id when
/// well-formed, else 32 lowercase hex digits made by the server.
///
/// Handlers take it as an extractor (it never fails):
///
/// ```
/// async fn handler(id: fastlane::RequestId) -> String {
///     format!("you are request {id}")
/// }
/// let app: axum::Router = axum::Router::new().route("/", axum::routing::get(handler));
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct RequestId(Repr);

/// A made (or trace) id is kept inline: it is made for nearly every
/// request, and cloned at each poll of its handler (see [`RequestId::enter`]),
/// so it should cost neither an allocation nor a shared count.
#[derive(Clone)]
enum Repr {
    /// 32 lowercase hex digits.
    Hex([u8; 32]),
    /// A client's `X-Request-Id`.
    Given(Arc<str>),
}

/// The `traceparent` header of W3C Trace Context.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

thread_local! {
    /// The request whose handler this thread is polling.
    static CURRENT: RefCell<Option<RequestId>> = const { RefCell::new(None) };
    /// Set while fastlane's own HTTP/1 loop polls a request's answer for
    /// the first time (see [`offer_head`]).
    static HEAD_OFFERED: Cell<bool> = const { Cell::new(false) };
    /// The id the answer just finished leaves for the loop to write, and
    /// where: after how many of the map's names it would have been inserted.
    static HEAD_ID: RefCell<Option<(RequestId, usize)>> = const { RefCell::new(None) };
}

/// Polls (with `poll`) the answer to a request read by fastlane's own HTTP/1
/// loop for the first time, offering to write its `x-request-id` into the
/// answer's head: the route layer that takes the request up in this poll
/// ([`claim_head`]; the outermost, since it is called before anything it
/// wraps) then leaves the id out of the answer's header map
/// ([`leave_for_head`]), and the loop writes it ([`take_for_head`]). A
/// header value and a map entry a request (an allocation, a hash insert,
/// their drop) for bytes the loop can copy. Requests that hyper reads never
/// see the offer: their ids go in the map.
pub(crate) fn offer_head<R>(poll: impl FnOnce() -> R) -> R {
    HEAD_OFFERED.set(true);
    let polled = poll();
    HEAD_OFFERED.set(false);
    polled
}

/// Takes up the offer of [`offer_head`], if one is open on this thread:
/// whether this request's id goes into the head rather than the map.
pub(crate) fn claim_head() -> bool {
    HEAD_OFFERED.replace(false)
}

/// Leaves a claimed request's id for the loop, when its answer (whose
/// headers these are) is ready. Where it would have been inserted is kept,
/// so that the head is written in the same order as before (axum's routes
/// add a `content-length` after the route layer's answer).
pub(crate) fn leave_for_head(id: &RequestId, headers: &HeaderMap) {
    HEAD_ID.with(|slot| *slot.borrow_mut() = Some((id.clone(), headers.keys_len())));
}

/// The id left by [`leave_for_head`] in the poll that made the answer
/// ready, and after how many header names it goes, if any (none left over:
/// the slot is emptied).
pub(crate) fn take_for_head() -> Option<(RequestId, usize)> {
    HEAD_ID.with(|slot| slot.borrow_mut().take())
}

impl RequestId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Hex digits only (see `new` and `trace_id`): always UTF-8.
            Repr::Hex(hex) => std::str::from_utf8(hex).unwrap_or_default(),
            Repr::Given(id) => id,
        }
    }

    /// The id of the request whose handler (or background task) this
    /// thread is running right now, on a fastlane server: what code called
    /// from there (a job enqueued, a client call) can tag its work with.
    /// `None` elsewhere (a task spawned with tokio, a test without a server).
    pub fn current() -> Option<RequestId> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Calls `f` with the [`current`](Self::current) id, without cloning it.
    pub(crate) fn with_current<R>(f: impl FnOnce(Option<&RequestId>) -> R) -> R {
        let mut f = Some(f);
        // Only fails while the thread is being torn down: no current id then.
        CURRENT
            .try_with(|c| (f.take().expect("called once"))(c.borrow().as_ref()))
            .unwrap_or_else(|_| (f.take().expect("called once"))(None))
    }

    /// The `request{id=...}` span the request's handler and background
    /// tasks are polled in, so that every event they log carries the id. At
    /// the error level so that it is on whenever anything is logged (a
    /// service run at `warn` keeps it too). `init_logging`'s text lines turn
    /// it off and write the id themselves (see `telemetry::line`).
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::error_span!(target: SPAN_TARGET, "request", id = %self)
    }

    /// Sets the `x-request-id` header of an answer to this id.
    pub(crate) fn set_header(&self, headers: &mut HeaderMap) {
        // The id is of characters a header value can hold (see `acceptable`
        // and `new`), so this does not fail.
        if let Ok(value) = http::HeaderValue::from_bytes(self.as_bytes()) {
            headers.insert(HEADER, value);
        }
    }

    /// The id's bytes (ASCII: see `acceptable` and `new`), as a head
    /// writes them.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Hex(hex) => &hex[..],
            Repr::Given(id) => id.as_bytes(),
        }
    }

    /// Makes this the [`current`](Self::current) id until the guard drops.
    pub(crate) fn enter(&self) -> CurrentGuard {
        CurrentGuard(CURRENT.with(|c| c.replace(Some(self.clone()))))
    }

    /// The id of a request with these headers: its `X-Request-Id` if that
    /// is 1 to 128 characters of `A-Z a-z 0-9 - _ . : + = / @`, else the
    /// trace id of a valid W3C `traceparent`, else a new one.
    pub(crate) fn for_headers(headers: &HeaderMap) -> Self {
        // Most requests carry neither: one look along the (few) names costs
        // less than a hashed lookup of each.
        if !headers.keys().any(|name| *name == HEADER || *name == TRACEPARENT) {
            return Self::new();
        }
        if let Some(id) = headers.get(HEADER).and_then(|v| v.to_str().ok()).filter(|v| acceptable(v)) {
            return Self(Repr::Given(id.into()));
        }
        let trace = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(trace_id);
        if let Some(hex) = trace.and_then(|t| <[u8; 32]>::try_from(t.as_bytes()).ok()) {
            return Self(Repr::Hex(hex));
        }
        Self::new()
    }

    /// A new id: 128 bits, as 32 hex digits (the shape of a W3C trace id),
    /// from a random per-process key and a count, mixed so that ids made
    /// one after another do not look alike.
    ///
    /// The count is each thread's own (its high bits the thread's number):
    /// one counter shared by every runner would have its cache line go back
    /// and forth between cores on every request.
    pub(crate) fn new() -> Self {
        static KEY: OnceLock<(u64, u64)> = OnceLock::new();
        static THREADS: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static NEXT: Cell<u64> = const { Cell::new(u64::MAX) };
        }
        let (hi, lo) = *KEY.get_or_init(|| {
            // The std hasher's keys are random per process; nothing to add.
            use std::hash::{BuildHasher, Hasher};
            let random = |salt: u64| {
                let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
                hasher.write_u64(salt);
                hasher.finish()
            };
            (random(1), random(2))
        });
        let n = NEXT.with(|next| {
            let mut n = next.get();
            // A thread's first id (the count starts at all ones), or 2^40
            // ids later: a new block of counts.
            if n & COUNT_MASK == COUNT_MASK {
                n = THREADS.fetch_add(1, Ordering::Relaxed) << 40;
            }
            next.set(n + 1);
            n
        });
        let mut hex = [0u8; 32];
        let bytes = [mix(hi ^ n).to_be_bytes(), mix(lo.wrapping_add(n)).to_be_bytes()];
        // A byte's two digits at a time, from a table: a digit at a time
        // was most of the cost of making an id.
        for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes.as_flattened()) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(*byte)]);
        }
        Self(Repr::Hex(hex))
    }
}

/// Restores the thread's previous current request when dropped.
pub(crate) struct CurrentGuard(Option<RequestId>);

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// The two lowercase hex digits of each byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let digits = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [digits[byte >> 4], digits[byte & 0xf]];
        byte += 1;
    }
    pairs
};

/// The low bits of a made id's count: a thread's own count, below its block.
const COUNT_MASK: u64 = (1 << 40) - 1;

/// SplitMix64's finaliser: a bijection on u64 that spreads every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether a client's `X-Request-Id` is taken as it is: short, and of
/// characters that need no escaping in a log line, a header or JSON.
fn acceptable(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:+=/@".contains(&b))
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
/// if it is one: lowercase hex, neither id all zeros, version not `ff`. A
/// later version may add fields after these four; they are ignored.
fn trace_id(value: &str) -> Option<&str> {
    let value = value.trim();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let mut parts = value.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some(trace)
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RequestId {}

impl std::hash::Hash for RequestId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn a_well_formed_client_id_is_kept_and_a_bad_one_replaced() {
        let id = RequestId::for_headers(&headers(&[("x-request-id", "req-42_a.b:c")]));
        assert_eq!(id.as_str(), "req-42_a.b:c");
        for bad in ["has space", "semi;colon", "", &"x".repeat(129), "tab\there"] {
            let id = RequestId::for_headers(&headers(&[("x-request-id", bad)]));
            assert_ne!(id.as_str(), bad);
            assert_eq!(id.as_str().len(), 32, "made: {id}");
        }
    }

    #[test]
    fn the_trace_id_of_a_valid_traceparent_is_taken() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let id =
            RequestId::for_headers(&headers(&[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))]));
        assert_eq!(id.as_str(), trace);
        // X-Request-Id wins when both are there.
        let both =
            headers(&[("x-request-id", "mine"), ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))]);
        assert_eq!(RequestId::for_headers(&both).as_str(), "mine");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_ne!(RequestId::for_headers(&headers(&[("traceparent", bad)])).as_str(), trace, "{bad}");
        }
        // A later version may carry more fields.
        let later = format!("01-{trace}-00f067aa0ba902b7-01-more");
        assert_eq!(RequestId::for_headers(&headers(&[("traceparent", &later)])).as_str(), trace);
    }

    #[test]
    fn made_ids_differ() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..1000).map(|_| RequestId::new()).collect::<Vec<_>>()))
            .collect();
        let mut ids: std::collections::HashSet<_> = (0..1000).map(|_| RequestId::new()).collect();
        for thread in threads {
            ids.extend(thread.join().unwrap());
        }
        assert_eq!(ids.len(), 5000);
        assert!(ids.iter().all(|id| id.as_str().len() == 32
            && id.as_str().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))));
        for (byte, pair) in HEX_PAIRS.iter().enumerate() {
            assert_eq!(pair, format!("{byte:02x}").as_bytes());
        }
    }
}

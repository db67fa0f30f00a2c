//! The wire between the front and a Python worker: frames, and the two
//! payloads that carry Python values (`marshal` data).
//!
//! A frame is a 9-byte header (payload length `u32`, type `u8`, request id
//! `u32`, little endian) and its payload. `python/fastlane_worker.py` has the
//! same type numbers.
//!
//! A request goes out as the `marshal` encoding of a tuple, which Python
//! decodes in C straight into the scope's `str`, `bytes` and tuples; the
//! response start comes back as `marshal.dumps((status, headers), 2)`, of
//! which only the few codes that version writes for ints, bytes, tuples and
//! lists are read here.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of a frame header.
pub(crate) const HEADER: usize = 9;

/// Process → front: who is calling (JSON).
pub(crate) const HELLO: u8 = 1;
/// Process → front: the import (zygote) or lifespan startup (worker) is done.
pub(crate) const READY: u8 = 2;
/// Process → front: the import or startup failed; text says what to do.
pub(crate) const FAILED: u8 = 3;
/// Front → zygote: fork worker number `id`.
pub(crate) const FORK: u8 = 4;
/// Zygote → front: a worker exited (JSON `pid`, `code`).
pub(crate) const EXITED: u8 = 5;
/// Front → zygote: SIGKILL the worker whose pid is the id.
pub(crate) const KILL: u8 = 6;
/// Front → zygote: set the nice value (`i32`) of the worker whose pid is the id;
/// [`IDLE_CLASS`] asks for the idle scheduling class.
pub(crate) const NICE: u8 = 8;
/// The `NICE` value that asks for the idle scheduling class (`SCHED_IDLE`),
/// beyond every nice value.
pub(crate) const IDLE_CLASS: i32 = 20;
/// Zygote → front: whether it could (one byte), for the pid in the id.
pub(crate) const NICED: u8 = 9;
/// Worker → front: `u32` more requests may be sent that it has not started.
pub(crate) const SLOTS: u8 = 7;
/// Front → worker: a request (marshal).
pub(crate) const REQUEST: u8 = 10;
/// Front → worker: a request body chunk (flags byte, bytes).
pub(crate) const BODY: u8 = 11;
/// Worker → front: the app waits for more request body.
pub(crate) const WANT_BODY: u8 = 12;
/// Front → worker: the client went away.
pub(crate) const DISCONNECT: u8 = 13;
/// Front → worker: `u32` more response bytes may be sent.
pub(crate) const CREDIT: u8 = 14;
/// Worker → front: status and headers (marshal).
pub(crate) const START: u8 = 15;
/// Worker → front: response body (flags byte, bytes).
pub(crate) const CHUNK: u8 = 16;
/// Worker → front: the response cannot be completed.
pub(crate) const RESET: u8 = 17;
/// Worker → front: the request's task ended, background tasks included.
pub(crate) const DONE: u8 = 18;
/// Front → worker: stop within `u32` milliseconds.
pub(crate) const SHUTDOWN: u8 = 20;
/// Worker → front: stopped (JSON: what was cut).
pub(crate) const BYE: u8 = 21;
/// Front → worker: a WebSocket handshake (a `REQUEST` payload).
pub(crate) const WS_CONNECT: u8 = 40;
/// Worker → front: the app accepted (marshal: subprotocol or None, headers).
pub(crate) const WS_ACCEPT: u8 = 41;
/// Worker → front: `u16` code and reason; before the accept, a denial.
pub(crate) const WS_CLOSE: u8 = 42;
/// Both ways: a text message (UTF-8).
pub(crate) const WS_TEXT: u8 = 43;
/// Both ways: a binary message.
pub(crate) const WS_BYTES: u8 = 44;
/// Front → worker: the client closed or went away (`u16` code).
pub(crate) const WS_GONE: u8 = 45;
/// Worker → front: `u32` more messages the app has taken.
pub(crate) const WS_TAKEN: u8 = 46;
/// Front → watchdog: the loop thread's stack, please.
pub(crate) const STACK: u8 = 30;
/// Watchdog → front: the stack (JSON).
pub(crate) const STACK_REPLY: u8 = 31;

/// Flags byte of `BODY` and `CHUNK`: more follows.
pub(crate) const MORE: u8 = 1;

/// A frame with `payload`, on its own.
pub(crate) fn encode(kind: u8, id: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER + payload.len());
    put(&mut out, kind, id, payload);
    out.freeze()
}

/// Appends a frame with `payload`.
pub(crate) fn put(out: &mut BytesMut, kind: u8, id: u32, payload: &[u8]) {
    put_header(out, kind, id, payload.len());
    out.put_slice(payload);
}

/// Appends a body frame: the flags byte, then `data`.
pub(crate) fn put_data(out: &mut BytesMut, kind: u8, id: u32, more: bool, data: &[u8]) {
    put_header(out, kind, id, 1 + data.len());
    out.put_u8(if more { MORE } else { 0 });
    out.put_slice(data);
}

/// Appends a frame whose payload is one `u32`.
pub(crate) fn put_u32(out: &mut BytesMut, kind: u8, id: u32, value: u32) {
    put(out, kind, id, &value.to_le_bytes());
}

fn put_header(out: &mut BytesMut, kind: u8, id: u32, len: usize) {
    let len = u32::try_from(len).expect("frames are far smaller than 4 GiB");
    out.put_u32_le(len);
    out.put_u8(kind);
    out.put_u32_le(id);
}

/// A frame header's fields.
pub(crate) fn parse_header(header: &[u8; HEADER]) -> (usize, u8, u32) {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let id = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    (len, header[4], id)
}

/// What a request frame carries: the scope's fields that vary, in the order
/// the worker unpacks them.
#[derive(Debug)]
pub(crate) struct RequestHead<'a> {
    pub(crate) method: &'a str,
    /// Percent-decoded.
    pub(crate) path: &'a str,
    pub(crate) raw_path: &'a [u8],
    pub(crate) query: &'a [u8],
    pub(crate) headers: &'a http::HeaderMap,
    pub(crate) client: Option<(String, u16)>,
    pub(crate) server: (String, u16),
    pub(crate) scheme: &'a str,
    pub(crate) http_version: &'a str,
    /// More body follows what `body` holds.
    pub(crate) more_body: bool,
    pub(crate) body: &'a [u8],
}

/// The payload of the `REQUEST` (or `WS_CONNECT`) frame for `head`, made
/// once: it is sent again as it is if a worker gives the request back, and
/// the request's own head (whose header values hold on to hyper's read
/// buffer) can be dropped at once, so that hyper reuses its buffer for the
/// next request instead of allocating another.
pub(crate) fn request_payload(head: &RequestHead<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(
        128 + head.path.len() * 2 + head.query.len() + head.body.len() + head.headers.len() * 48,
    );
    let mut m = Marshal(&mut out);
    m.small_tuple(11);
    m.str(head.method);
    m.str(head.path);
    m.bytes(head.raw_path);
    m.bytes(head.query);
    m.list(head.headers.len());
    for (name, value) in head.headers {
        m.small_tuple(2);
        // `http` keeps header names lowercase, as ASGI wants them.
        m.bytes(name.as_str().as_bytes());
        m.bytes(value.as_bytes());
    }
    match &head.client {
        Some((host, port)) => {
            m.small_tuple(2);
            m.str(host);
            m.int(i32::from(*port));
        }
        None => m.none(),
    }
    m.small_tuple(2);
    m.str(&head.server.0);
    m.int(i32::from(head.server.1));
    m.str(head.scheme);
    m.str(head.http_version);
    m.bool(head.more_body);
    m.bytes(head.body);
    out.freeze()
}

/// Writes `marshal` codes (the subset every Python 3 reads).
struct Marshal<'a>(&'a mut BytesMut);

impl Marshal<'_> {
    fn small_tuple(&mut self, n: u8) {
        self.0.put_u8(b')');
        self.0.put_u8(n);
    }
    fn list(&mut self, n: usize) {
        self.0.put_u8(b'[');
        self.0.put_u32_le(n as u32);
    }
    fn str(&mut self, s: &str) {
        self.0.put_u8(b'u');
        self.0.put_u32_le(s.len() as u32);
        self.0.put_slice(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.put_u8(b's');
        self.0.put_u32_le(b.len() as u32);
        self.0.put_slice(b);
    }
    fn int(&mut self, v: i32) {
        self.0.put_u8(b'i');
        self.0.put_i32_le(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.put_u8(if v { b'T' } else { b'F' });
    }
    fn none(&mut self) {
        self.0.put_u8(b'N');
    }
}

/// Header names and values, as the app sent them.
pub(crate) type Headers = Vec<(Bytes, Bytes)>;

/// A response start the front cannot use; says what the app got wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub(crate) struct BadStart(pub(crate) String);

/// Status and headers from a `START` payload.
pub(crate) fn decode_start(payload: &[u8]) -> Result<(u16, Headers), BadStart> {
    let mut r = Reader { data: payload, pos: 0 };
    if r.sequence()? != 2 {
        return Err(BadStart("the start message is not (status, headers)".into()));
    }
    let status = match r.code()? {
        b'i' => r.i32()?,
        b'T' | b'F' => return Err(BadStart("the response status is a bool, not an int".into())),
        other => {
            return Err(BadStart(format!("the response status is not an int (marshal code {other:#x})")))
        }
    };
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (100..=999).contains(s))
        .ok_or_else(|| BadStart(format!("the response status {status} is not between 100 and 999")))?;
    let headers = r.headers()?;
    Ok((status, headers))
}

/// The subprotocol and headers of a `WS_ACCEPT` payload.
pub(crate) fn decode_accept(payload: &[u8]) -> Result<(Option<String>, Headers), BadStart> {
    let mut r = Reader { data: payload, pos: 0 };
    if r.sequence()? != 2 {
        return Err(BadStart("the accept message is not (subprotocol, headers)".into()));
    }
    let protocol = match r.code()? {
        b'N' => None,
        b'u' | b't' => {
            let n = usize::try_from(r.i32()?).map_err(|_| BadStart("a negative length".into()))?;
            let text = std::str::from_utf8(r.take(n)?)
                .map_err(|_| BadStart("the subprotocol is not UTF-8".into()))?;
            Some(text.to_owned())
        }
        other => {
            return Err(BadStart(format!("the subprotocol is not a str or None (marshal code {other:#x})")))
        }
    };
    let headers = r.headers()?;
    Ok((protocol, headers))
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadStart> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.data.len());
        let end = end.ok_or_else(|| BadStart("the start message is cut short".into()))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn code(&mut self) -> Result<u8, BadStart> {
        // Version 2 writes no reference flags; mask it anyway.
        Ok(self.take(1)?[0] & 0x7f)
    }
    fn i32(&mut self) -> Result<i32, BadStart> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn sequence(&mut self) -> Result<usize, BadStart> {
        match self.code()? {
            b'(' | b'[' => {
                let n = self.i32()?;
                usize::try_from(n).map_err(|_| BadStart("a negative length".into()))
            }
            b')' => Ok(usize::from(self.take(1)?[0])),
            other => Err(BadStart(format!("expected a tuple or list, found marshal code {other:#x}"))),
        }
    }
    fn headers(&mut self) -> Result<Headers, BadStart> {
        let n = self.sequence()?;
        let mut headers = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            if self.sequence()? != 2 {
                return Err(BadStart("a response header is not a (name, value) pair".into()));
            }
            let name = self.bytes("name")?;
            let value = self.bytes("value")?;
            headers.push((Bytes::copy_from_slice(name), Bytes::copy_from_slice(value)));
        }
        Ok(headers)
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], BadStart> {
        match self.code()? {
            b's' => {
                let n = usize::try_from(self.i32()?).map_err(|_| BadStart("a negative length".into()))?;
                self.take(n)
            }
            b'u' | b't' | b'a' | b'A' | b'z' | b'Z' | b'r' => Err(BadStart(format!(
                "a response header {what} is a str; ASGI header names and values are bytes"
            ))),
            other => {
                Err(BadStart(format!("a response header {what} is not bytes (marshal code {other:#x})")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_as_python_marshals_it_is_read() {
        // marshal.dumps((200, [(b"content-type", b"text/plain"), (b"x", b"")]), 2)
        let mut data = vec![b'(', 2, 0, 0, 0, b'i', 200, 0, 0, 0, b'[', 2, 0, 0, 0];
        for (name, value) in [(&b"content-type"[..], &b"text/plain"[..]), (b"x", b"")] {
            data.extend([b'(', 2, 0, 0, 0, b's']);
            data.extend((name.len() as u32).to_le_bytes());
            data.extend(name);
            data.push(b's');
            data.extend((value.len() as u32).to_le_bytes());
            data.extend(value);
        }
        let (status, headers) = decode_start(&data).unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers[0].0.as_ref(), b"content-type");
        assert_eq!(headers[1].1.as_ref(), b"");
    }

    #[test]
    fn a_str_header_is_named_as_the_mistake_it_is() {
        let data = [
            b'(', 2, 0, 0, 0, b'i', 200, 0, 0, 0, b'[', 1, 0, 0, 0, b'(', 2, 0, 0, 0, b'u', 1, 0, 0, 0, b'a',
        ];
        let err = decode_start(&data).unwrap_err();
        assert!(err.0.contains("is a str"), "{err}");
        assert!(decode_start(&data[..7]).unwrap_err().0.contains("cut short"));
    }
}

//! Watches the bytes a client sends for what the header-read timeout needs
//! to know of HTTP/2: whether the connection is HTTP/2 at all, and whether
//! it is in the middle of sending a header block.
//!
//! hyper's HTTP/2 server has no deadline of its own for a client that opens
//! a connection and then sends its preface, its SETTINGS or a request's
//! headers a byte at a time (or never finishes them): such a connection
//! would be held open forever, the HTTP/2 form of slowloris. The frames are
//! not decoded here, only delimited: a frame header is 9 bytes whose first
//! three give the payload's length, so following the stream costs a few
//! comparisons per frame, whatever the payload's size.

/// The client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Preface bytes after which the connection is surely HTTP/2.
const SURE_AFTER: usize = 4;

const FRAME_HEADER_LEN: usize = 9;
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;

/// What the bytes seen so far say about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// Too few bytes to tell yet (a prefix of the HTTP/2 preface).
    Unknown,
    /// Not HTTP/2 (an HTTP/1 request, or garbage): not followed further.
    Http1,
    /// HTTP/2. `pending` is true while the client owes us the rest of
    /// something that must arrive promptly: the preface and its first
    /// SETTINGS frame, a frame header, or a header block (HEADERS and its
    /// CONTINUATION frames up to END_HEADERS) or another control frame.
    /// A DATA frame's payload (a request body) may arrive at the client's
    /// own pace.
    Http2 { pending: bool },
}

/// Follows a connection's incoming bytes.
#[derive(Debug)]
pub(crate) struct FrameScanner {
    /// Preface bytes matched so far; `PREFACE.len()` once it is complete.
    preface: usize,
    http1: bool,
    /// The first SETTINGS frame has arrived whole.
    settled: bool,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come, and its type.
    payload_left: usize,
    frame_type: u8,
    /// A HEADERS frame without END_HEADERS has been seen: CONTINUATION
    /// frames follow until one carries it.
    header_block_open: bool,
}

impl Default for FrameScanner {
    fn default() -> Self {
        Self {
            preface: 0,
            http1: false,
            settled: false,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            frame_type: TYPE_DATA,
            header_block_open: false,
        }
    }
}

impl FrameScanner {
    /// Follows `bytes`, the next ones read from the connection.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Sniffed {
        if self.http1 {
            return Sniffed::Http1;
        }
        if self.preface < PREFACE.len() {
            let want = &PREFACE[self.preface..];
            let n = want.len().min(bytes.len());
            if bytes[..n] != want[..n] {
                self.http1 = true;
                return Sniffed::Http1;
            }
            self.preface += n;
            bytes = &bytes[n..];
            if self.preface < PREFACE.len() {
                return self.state();
            }
        }
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                let [l0, l1, l2, kind, ..] = self.header;
                self.payload_left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                self.frame_type = kind;
                if self.payload_left == 0 {
                    self.frame_done();
                }
            }
        }
        self.state()
    }

    /// The current frame has arrived whole.
    fn frame_done(&mut self) {
        let flags = self.header[4];
        match self.frame_type {
            TYPE_HEADERS | TYPE_CONTINUATION => self.header_block_open = flags & FLAG_END_HEADERS == 0,
            TYPE_SETTINGS => self.settled = true,
            _ => {}
        }
    }

    fn state(&self) -> Sniffed {
        if self.http1 {
            return Sniffed::Http1;
        }
        // `P`, `PR` and `PRI` also begin HTTP/1 methods (or could); `PRI `
        // begins no HTTP/1 request hyper would serve.
        if self.preface < SURE_AFTER {
            return Sniffed::Unknown;
        }
        let mid_frame = self.header_len > 0 || (self.payload_left > 0 && self.frame_type != TYPE_DATA);
        let pending = !self.settled || mid_frame || self.header_block_open;
        Sniffed::Http2 { pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 1];
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn http1_requests_are_told_apart_at_their_first_bytes() {
        for request in [&b"GET / HTTP/1.1\r\n"[..], b"POST /x HTTP/1.1", b"PUT", b"P", b"\x16\x03\x01"] {
            let mut scanner = FrameScanner::default();
            let sniffed = scanner.feed(request);
            let expected = if request == b"P" { Sniffed::Unknown } else { Sniffed::Http1 };
            assert_eq!(sniffed, expected, "{request:?}");
        }
        let mut scanner = FrameScanner::default();
        assert_eq!(scanner.feed(b"P"), Sniffed::Unknown);
        assert_eq!(scanner.feed(b"OST /"), Sniffed::Http1);
        assert_eq!(scanner.feed(b"PRI * HTTP/2.0"), Sniffed::Http1, "decided once");
    }

    #[test]
    fn an_http2_connection_is_pending_until_its_preface_and_settings_are_whole() {
        let mut scanner = FrameScanner::default();
        assert_eq!(scanner.feed(b"PRI "), Sniffed::Http2 { pending: true });
        assert_eq!(scanner.feed(&PREFACE[4..]), Sniffed::Http2 { pending: true });
        let settings = frame(TYPE_SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        assert_eq!(scanner.feed(&settings[..5]), Sniffed::Http2 { pending: true });
        assert_eq!(scanner.feed(&settings[5..]), Sniffed::Http2 { pending: false });
    }

    #[test]
    fn a_header_block_is_pending_until_end_headers_whatever_the_split() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(TYPE_SETTINGS, 0, &[]));
        let settled_at = stream.len();
        stream.extend(frame(TYPE_HEADERS, 0, &[0x82; 20]));
        stream.extend(frame(TYPE_CONTINUATION, 0, &[0x84; 7]));
        stream.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, &[0x86; 3]));
        let block_done_at = stream.len();
        stream.extend(frame(TYPE_DATA, 0, &[7; 50]));
        let data_header_done_at = block_done_at + FRAME_HEADER_LEN;
        // Fed one byte at a time: pending exactly while the block is open,
        // and not during a DATA payload.
        let mut scanner = FrameScanner::default();
        for (i, byte) in stream.iter().enumerate() {
            let fed = i + 1;
            let expected = fed < settled_at
                || (fed > settled_at && fed < block_done_at)
                || (fed > block_done_at && fed < data_header_done_at);
            let expected =
                if fed < SURE_AFTER { Sniffed::Unknown } else { Sniffed::Http2 { pending: expected } };
            assert_eq!(scanner.feed(&[*byte]), expected, "after {fed} bytes");
        }
        // Fed in one piece, the same end state.
        let mut scanner = FrameScanner::default();
        assert_eq!(scanner.feed(&stream), Sniffed::Http2 { pending: false });
    }

    #[test]
    fn a_large_data_frame_is_skipped_by_its_length() {
        let mut scanner = FrameScanner::default();
        scanner.feed(PREFACE);
        scanner.feed(&frame(TYPE_SETTINGS, 0, &[]));
        let data = frame(TYPE_DATA, 0, &vec![0x01; 70_000]);
        assert_eq!(scanner.feed(&data[..100]), Sniffed::Http2 { pending: false });
        assert_eq!(scanner.feed(&data[100..]), Sniffed::Http2 { pending: false });
        // The next frame is read from the right place.
        assert_eq!(scanner.feed(&frame(TYPE_HEADERS, 0, &[1])), Sniffed::Http2 { pending: true });
    }
}

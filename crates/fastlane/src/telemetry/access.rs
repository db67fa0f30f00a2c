//! The access log line: one human-readable line per request, as the seed
//! article's `log_requests` middleware prints it (`GET /users/{id} 200
//! 1.3ms`), written straight into the log pipe when
//! [`init_logging`](super::init_logging) writes text lines.
//!
//! A line per request is the busiest thing a server logs. As a `tracing`
//! event it goes through the dispatcher, the subscriber's filter, the
//! formatting layer (span lookup, a field visitor per field, a `String` per
//! line) and then the pipe; measured, that was most of the ~2 µs the access
//! log added to a hello-world request. The line's shape is fixed and its
//! fields are known, so when our own text subscriber is installed it is
//! written here instead: the same bytes (a test compares them with the
//! event's), put together byte by byte (no `fmt` machinery: at a line per
//! request its dynamic calls and padding checks were most of a line's cost;
//! bytes, not a `String`, so that nothing is checked to be UTF-8 again) in
//! buffers of the thread's own, and copied into the pipe. `tracing`'s
//! filter still decides whether it is written
//! (`RUST_LOG=fastlane::request=off`, `--no-access-log`). With any other
//! subscriber (an app's own, or `--log-format json`) the line stays a
//! `tracing` event, target `fastlane::request`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use super::clock::push_now;
use super::pipe::PipeWriter;
use super::Escaped;
use crate::request_id::RequestId;

/// Where access lines go when they bypass `tracing`; set by `init_logging`
/// (text lines) alone.
static DIRECT: OnceLock<Direct> = OnceLock::new();

struct Direct {
    pipe: PipeWriter,
    ansi: bool,
    /// Whether the filter lets `fastlane::request` lines through: asked once,
    /// when `init_logging` installed its subscriber (the filter is fixed
    /// from then on), instead of asking the dispatcher on every request.
    enabled: bool,
}

/// Sends access lines straight to `pipe` from now on. Called once the
/// subscriber is installed, whose filter decides if they are written.
pub(super) fn write_directly(pipe: PipeWriter, ansi: bool) {
    let enabled = tracing::enabled!(target: "fastlane::request", tracing::Level::INFO);
    let _ = DIRECT.set(Direct { pipe, ansi, enabled });
}

/// Whether access lines are written (`RUST_LOG=fastlane::request=off` and
/// `--no-access-log` turn them off): `tracing`'s filter decides.
pub(crate) fn enabled() -> bool {
    match DIRECT.get() {
        Some(direct) => direct.enabled,
        None => tracing::enabled!(target: "fastlane::request", tracing::Level::INFO),
    }
}

/// What comes between the timestamp and the message, as `TextLine` writes
/// an `INFO` event of target `fastlane::request`: plain, and with ANSI
/// colours (the timestamp's dimming ends the first).
const HEAD: &str = "  INFO fastlane::request: ";
const HEAD_ANSI: &str = "\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mfastlane::request\x1b[0m\x1b[2m:\x1b[0m ";

thread_local! {
    /// The message and the line being put together: kept, so that no line
    /// allocates.
    static BUFFERS: RefCell<(String, Vec<u8>)> = const { RefCell::new((String::new(), Vec::new())) };
    /// The client address last written on this thread, and its text: most
    /// lines in a row come from the same few clients (or the one proxy).
    static LAST_CLIENT: RefCell<Option<(IpAddr, String)>> = const { RefCell::new(None) };
}

/// The parts of an access line.
pub(crate) struct AccessLine<'a> {
    /// The request's method.
    pub(crate) method: &'a str,
    /// Its route (`/users/{id}`), or its path when it matched none.
    pub(crate) path: &'a str,
    /// The status answered (499 when the client went away first).
    pub(crate) status: u16,
    /// From the request to the end of its response.
    pub(crate) elapsed: Duration,
    /// After the duration: empty, or why and how a stream ended
    /// (` (headers 1.0ms)`).
    pub(crate) ending: &'a str,
    /// The client's address, if known.
    pub(crate) client: Option<IpAddr>,
    /// The request's id.
    pub(crate) request_id: &'a RequestId,
}

/// Writes the access line: straight into the log pipe if `init_logging` set
/// that up, as a `tracing` event (`fastlane::request`) otherwise. The caller
/// has checked that `fastlane::request` lines are [`enabled`].
pub(crate) fn log(line: &AccessLine<'_>) {
    BUFFERS.with(|buffers| {
        let mut fresh = (String::new(), Vec::new());
        // Re-entered (a subscriber that logs an access line of its own):
        // fresh buffers are as good.
        let mut kept = buffers.try_borrow_mut();
        let (message, out) = match kept.as_deref_mut() {
            Ok(buffers) => buffers,
            Err(_) => &mut fresh,
        };
        message.clear();
        match DIRECT.get() {
            Some(direct) => {
                out.clear();
                format(out, message, line, direct.ansi);
                let mut pipe = direct.pipe;
                let _ = std::io::Write::write(&mut pipe, out);
            }
            None => {
                write_message(message, line);
                event(line, message);
            }
        }
        // A line that grew large once is not kept.
        if message.capacity() > 4096 {
            *message = String::new();
        }
        if out.capacity() > 4096 {
            *out = Vec::new();
        }
    });
}

/// The line as a `tracing` event, for any subscriber but `init_logging`'s.
fn event(line: &AccessLine<'_>, message: &str) {
    tracing::info!(
        target: "fastlane::request",
        client = line.client.map(tracing::field::display),
        request_id = %line.request_id,
        "{}",
        message
    );
}

/// What a line is written into: the direct line's bytes, or a `String` (an
/// event's message, a stream's ending).
pub(crate) trait Text {
    /// Appends `s`.
    fn text(&mut self, s: &str);
    /// Appends an ASCII character.
    fn ascii(&mut self, b: u8);
}

impl Text for String {
    fn text(&mut self, s: &str) {
        self.push_str(s);
    }

    fn ascii(&mut self, b: u8) {
        self.push(char::from(b));
    }
}

impl Text for Vec<u8> {
    fn text(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }

    fn ascii(&mut self, b: u8) {
        self.push(b);
    }
}

/// `fmt` into bytes (the rare parts of a line: escaping, a cut).
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `GET /users/{id} 200 1.3ms` and the ending.
fn write_message(out: &mut impl Text, line: &AccessLine<'_>) {
    out.text(line.method);
    out.ascii(b' ');
    out.text(line.path);
    out.ascii(b' ');
    push_decimal(out, u64::from(line.status));
    out.ascii(b' ');
    push_millis(out, line.elapsed);
    out.text("ms");
    out.text(line.ending);
}

/// The line as `TextLine` writes the event [`log`] would log:
/// `<time>  INFO fastlane::request: <message> client=<ip> request_id=<id>`,
/// the message escaped and cut at 1 KiB as a message field is. `message`
/// is scratch space, for a line that needs escaping or cutting.
fn format(out: &mut Vec<u8>, message: &mut String, line: &AccessLine<'_>, ansi: bool) {
    if ansi {
        out.text("\x1b[2m");
    }
    push_now(out);
    out.text(if ansi { HEAD_ANSI } else { HEAD });
    let max_len = super::LogFields::default().max_len;
    // The usual line: the message written in place. Only the path and the
    // ending can hold anything to escape (the method is an HTTP token, the
    // rest digits), and a message is far from the cut unless its path is
    // long.
    let plain = |text: &str| text.bytes().all(|b| (0x20..0x7f).contains(&b));
    // The status, the duration (at most 20 digits and `.Xms`) and the
    // spaces take under 40 bytes.
    let short = line.method.len() + line.path.len() + line.ending.len() + 40 <= max_len;
    if short && plain(line.path) && plain(line.ending) {
        write_message(out, line);
    } else {
        message.clear();
        write_message(message, line);
        let message = message.as_str();
        let mut bytes = Bytes(out);
        let mut escaped = Escaped { out: &mut bytes, left: max_len, dropped: 0 };
        let _ = escaped.write_str(message);
        let dropped = escaped.dropped;
        if dropped > 0 {
            let _ = write!(bytes, "…[{dropped} more bytes]");
        }
    }
    if let Some(client) = line.client {
        out.text(" client=");
        LAST_CLIENT.with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some((ip, text)) if *ip == client => out.text(text),
                _ => {
                    let mut text = String::new();
                    push_ip(&mut text, client);
                    out.text(&text);
                    *last = Some((client, text));
                }
            }
        });
    }
    out.text(" request_id=");
    out.extend_from_slice(line.request_id.as_bytes());
    out.push(b'\n');
}

/// `n` in decimal.
pub(crate) fn push_decimal(out: &mut impl Text, n: u64) {
    // ASCII digits, appended as such: no UTF-8 check.
    for &digit in decimal(&mut [0; 20], n) {
        out.ascii(digit);
    }
}

/// `n` in decimal, written at the end of `digits`.
pub(crate) fn decimal(digits: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

/// Milliseconds to one decimal (`1.3`, rounded half up), as `{:.1}` of the
/// float writes them, with integers.
pub(crate) fn push_millis(out: &mut impl Text, d: Duration) {
    // Whole seconds are whole tenths of a millisecond: only the fraction
    // is rounded.
    let tenths = d.as_secs() * 10_000 + (u64::from(d.subsec_nanos()) + 50_000) / 100_000;
    push_decimal(out, tenths / 10);
    out.ascii(b'.');
    out.ascii(b'0' + (tenths % 10) as u8);
}

/// A client's address as std writes it: IPv4 digit by digit (std's
/// `Display` pads through a buffer), IPv6 through std.
fn push_ip(out: &mut String, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_decimal(out, u64::from(octet));
    }
}

#[cfg(test)]
mod tests {
    use super::super::Written;
    use super::*;
    use crate::LogFields;

    /// The event [`log`] logs when there is no direct pipe, through the
    /// text subscriber.
    fn as_event(line: &AccessLine<'_>, ansi: bool) -> String {
        let written = Written::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(LogFields::default())
            .with_ansi(ansi)
            .event_format(super::super::line::TextLine)
            .with_writer(written.clone())
            .finish();
        let mut message = String::new();
        write_message(&mut message, line);
        tracing::subscriber::with_default(subscriber, || event(line, &message));
        written.text()
    }

    fn direct(line: &AccessLine<'_>, ansi: bool) -> String {
        let (mut message, mut out) = (String::new(), Vec::new());
        format(&mut out, &mut message, line, ansi);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_direct_line_is_the_events_line_byte_for_byte() {
        let id = RequestId::new();
        let long = format!("/{}", "x".repeat(3000));
        let forged = "/a\n2026-11-26T00:00:00.000000Z ERROR fastlane::server: FAKE\u{1b}[2K";
        let line = |method, path, status, micros, ending, client: Option<&str>| AccessLine {
            method,
            path,
            status,
            elapsed: Duration::from_micros(micros),
            ending,
            client: client.map(|c| c.parse().unwrap()),
            request_id: &id,
        };
        let lines = [
            line("GET", "/users/{id}", 200, 1_250, "", Some("203.0.113.7")),
            line("POST", "/jobs/{name}", 201, 12, "", None),
            line("GET", forged, 404, 80, "", Some("::1")),
            line("GET", &long, 404, 0, "", Some("10.0.0.1")),
            line("GET", "/café ✓", 200, 999_960, "", Some("255.255.255.255")),
            line(
                "GET",
                "/stream",
                200,
                12_000,
                " (headers 1.0ms; the body was cut short)",
                Some("9.99.100.1"),
            ),
        ];
        for ansi in [false, true] {
            for line in &lines {
                let ours = direct(line, ansi);
                let theirs = as_event(line, ansi);
                // The timestamps are taken a moment apart: compare after them.
                let skip = |s: &str| s.split_once('Z').map(|(_, rest)| rest.to_owned()).unwrap();
                assert_eq!(skip(&ours), skip(&theirs), "ansi {ansi}");
                assert_eq!(ours[..ours.find('Z').unwrap()].len(), theirs[..theirs.find('Z').unwrap()].len());
            }
        }
        let forged_line = direct(&lines[2], false);
        assert!(!forged_line.contains("\nFAKE") && forged_line.ends_with(&format!("request_id={id}\n")));
        assert!(direct(&lines[3], false).contains("…[1991 more bytes] client=10.0.0.1"));
    }

    #[test]
    fn numbers_read_as_std_writes_them() {
        for ip in
            ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "9.99.100.1", "::1", "2001:db8::7"]
        {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
        for n in [0, 7, 10, 499, 65_535, u64::MAX] {
            let mut out = String::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string());
        }
        for (nanos, expected) in [
            (0, "0.0"),
            (12_000, "0.0"),
            (49_999, "0.0"),
            (50_000, "0.1"),
            (1_250_000, "1.3"),
            (999_960_000, "1000.0"),
            (3_600_000_049_999, "3600000.0"),
            (3_600_000_050_000, "3600000.1"),
        ] {
            let mut out = String::new();
            push_millis(&mut out, Duration::from_nanos(nanos));
            assert_eq!(out, expected, "{nanos} ns");
            assert_eq!(out, format!("{:.1}", (nanos as f64 / 1e5).round() / 10.0), "{nanos} ns");
        }
    }
}

//! The access log line, written straight into the log pipe when
//! [`init_logging`](super::init_logging) writes text lines.
//!
//! A line per request is the busiest thing a server logs. As a `tracing`
//! event it goes through the dispatcher, the subscriber's filter, the
//! formatting layer (span lookup, a field visitor per field, a `String` per
//! line) and then the pipe; measured, that was most of the ~2 µs the access
//! log added to a hello-world request. The line's shape is fixed and its
//! fields are known, so when our own text subscriber is installed it is
//! written here instead: the same bytes (a test compares them with the
//! event's), formatted into a buffer of the thread's own and copied into the
//! pipe. `tracing`'s filter still decides whether it is written
//! (`RUST_LOG=fastlane::request=off`, `--no-access-log`). With any other
//! subscriber (an app's own, or `--log-format json`) the line stays a
//! `tracing` event, target `fastlane::request`.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;

use tracing_subscriber::fmt::format::Writer;

use super::line::{write_start, write_target};
use super::pipe::PipeWriter;
use super::Escaped;

/// Where access lines go when they bypass `tracing`; set by `init_logging`
/// (text lines) alone.
static DIRECT: OnceLock<Direct> = OnceLock::new();

struct Direct {
    pipe: PipeWriter,
    ansi: bool,
}

/// Sends access lines straight to `pipe` from now on.
pub(super) fn write_directly(pipe: PipeWriter, ansi: bool) {
    let _ = DIRECT.set(Direct { pipe, ansi });
}

thread_local! {
    /// The line being formatted: kept, so that no line allocates.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The parts of an access line.
pub(crate) struct AccessLine<'a> {
    /// `GET /users/{id} 200 1.3ms (...)`: escaped and cut at 1 KiB as a
    /// message field is.
    pub(crate) message: fmt::Arguments<'a>,
    /// The client's address, if known.
    pub(crate) client: Option<&'a dyn fmt::Display>,
    /// The request's id.
    pub(crate) request_id: &'a dyn fmt::Display,
}

/// Writes `line` straight into the log pipe, if `init_logging` set that up;
/// `false` if the caller must log it as a `tracing` event instead. The
/// caller has checked that `fastlane::request` lines are enabled.
pub(crate) fn write(line: &AccessLine<'_>) -> bool {
    let Some(direct) = DIRECT.get() else {
        return false;
    };
    LINE.with(|buffer| {
        let Ok(mut buffer) = buffer.try_borrow_mut() else {
            // Re-entered (a `Display` that logs): the slow way is safe.
            return false;
        };
        buffer.clear();
        if format(&mut buffer, line, direct.ansi).is_err() {
            return false;
        }
        let mut pipe = direct.pipe;
        let _ = std::io::Write::write(&mut pipe, buffer.as_bytes());
        // A line that grew large once is not kept.
        if buffer.capacity() > 4096 {
            *buffer = String::new();
        }
        true
    })
}

/// The line as `TextLine` writes the event `answered` logs:
/// `<time>  INFO fastlane::request: <message> client=<ip> request_id=<id>`.
fn format(out: &mut String, line: &AccessLine<'_>, ansi: bool) -> fmt::Result {
    let mut writer = Writer::new(out);
    write_start(&mut writer, tracing::Level::INFO, ansi)?;
    write_target(&mut writer, "fastlane::request", ansi)?;
    let mut escaped = Escaped { out: &mut writer, left: super::LogFields::default().max_len, dropped: 0 };
    escaped.write_fmt(line.message)?;
    let dropped = escaped.dropped;
    if dropped > 0 {
        write!(writer, "…[{dropped} more bytes]")?;
    }
    if let Some(client) = line.client {
        write!(writer, " client={client}")?;
    }
    writeln!(writer, " request_id={}", line.request_id)
}

#[cfg(test)]
mod tests {
    use super::super::Written;
    use super::*;
    use crate::LogFields;

    /// The event `answered` would log, through the text subscriber.
    fn as_event(message: fmt::Arguments<'_>, client: Option<&str>, request_id: &str, ansi: bool) -> String {
        let written = Written::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(LogFields::default())
            .with_ansi(ansi)
            .event_format(super::super::line::TextLine)
            .with_writer(written.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "fastlane::request",
                client = client.map(tracing::field::display),
                request_id = %request_id,
                "{}",
                message
            );
        });
        written.text()
    }

    fn direct(message: fmt::Arguments<'_>, client: Option<&str>, request_id: &str, ansi: bool) -> String {
        let client = client.as_ref().map(|c| c as &dyn fmt::Display);
        let mut out = String::new();
        format(&mut out, &AccessLine { message, client, request_id: &request_id }, ansi).unwrap();
        out
    }

    #[test]
    fn the_direct_line_is_the_events_line_byte_for_byte() {
        let long = "x".repeat(3000);
        let forged = "/a\n2026-11-26T00:00:00.000000Z ERROR fastlane::server: FAKE\u{1b}[2K";
        let cases: Vec<(String, Option<&str>)> = vec![
            ("GET /users/{id} 200 1.3ms".into(), Some("203.0.113.7")),
            ("POST /jobs/{name} 201 0.0ms".into(), None),
            (format!("GET {forged} 404 0.1ms"), Some("::1")),
            (format!("GET /{long} 404 0.0ms"), Some("10.0.0.1")),
            ("GET /stream 200 12.0ms (headers 1.0ms; the body was cut short)".into(), Some("127.0.0.1")),
        ];
        for ansi in [false, true] {
            for (message, client) in &cases {
                let ours = direct(format_args!("{message}"), *client, "4bf92f3577b34da6", ansi);
                let theirs = as_event(format_args!("{message}"), *client, "4bf92f3577b34da6", ansi);
                // The timestamps are taken a moment apart: compare after them.
                let skip = |s: &str| s.split_once('Z').map(|(_, rest)| rest.to_owned()).unwrap();
                assert_eq!(skip(&ours), skip(&theirs), "ansi {ansi}");
            }
        }
        assert!(!direct(format_args!("GET {forged} 404 0.1ms"), None, "id", false).contains("\nFAKE"));
    }
}

//! Logging set-up for binaries, with log lines that a client cannot forge.
//!
//! Request-derived values reach log lines all the time: a name from a JSON
//! body, a path, a header. Written as they are, a value holding a newline
//! starts a line of the client's choosing (`...\n2026-11-26T00:00:00Z ERROR
//! fastlane::server: FAKE`), an escape sequence recolours or rewrites the
//! terminal, and a 2 MB value becomes a 2 MB line. [`LogFields`] writes every
//! field (the message included) with control characters escaped and its
//! length bounded.

pub(crate) mod access;
mod clock;
mod line;
mod pipe;

use line::REQUEST_SPAN_TARGET;

pub(crate) use pipe::dropped as log_lines_dropped;

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// Installs a `tracing` subscriber that prints to stderr, filtered by
/// `RUST_LOG` (default: `info` for everything). Call it once at the start of
/// `main`; a second call does nothing.
///
/// Request lines look like `GET /users/{id} 200 1.3ms`: the seed article's
/// `log_requests` middleware, built in. Every field is written by
/// [`LogFields`]: control characters escaped, values bounded.
pub fn init_logging() {
    init_logging_with(&LogConfig::default());
}

/// What [`init_logging_with`] sets up; [`ServeArgs::log_config`](crate::ServeArgs::log_config)
/// reads it from `--log-level`, `--access-log` / `--no-access-log` and
/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// The least severe level written. `RUST_LOG`, when set, replaces it
    /// with a filter of its own (`fastlane=debug,sqlx=warn`).
    pub level: tracing::Level,
    /// A line per request (`GET /users/{id} 200 1.3ms`, target
    /// `fastlane::request`). Off, every other line stays.
    pub access_log: bool,
    /// Lines for people, or JSON objects for a log shipper.
    pub format: LogFormat,
}

impl Default for LogConfig {
    /// `info`, with the access log, as text.
    fn default() -> Self {
        Self { level: tracing::Level::INFO, access_log: true, format: LogFormat::Text }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-27T10:00:00Z  INFO request{id=...}: target: message key=value`,
    /// every field escaped and cut at 1 KiB ([`LogFields`]).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (the message and the event's fields) and `span` (the request's id,
    /// inside a request). JSON escapes what a client sent; values are not
    /// cut.
    Json,
}

/// [`init_logging`] with a level and the access log chosen.
pub fn init_logging_with(config: &LogConfig) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let level = config.level.to_string().to_ascii_lowercase();
    // RUST_LOG wins when it says something; set but empty, it says nothing.
    let filter = match std::env::var("RUST_LOG") {
        Ok(rust_log) if !rust_log.trim().is_empty() => EnvFilter::try_new(&rust_log).unwrap_or_else(|err| {
            eprintln!("RUST_LOG=`{rust_log}` is not a filter ({err}); logging at {level} instead");
            EnvFilter::new(&level)
        }),
        _ => EnvFilter::new(level),
    };
    let filter = match config.access_log {
        true => filter,
        // A directive this simple always parses.
        false => filter.add_directive("fastlane::request=off".parse().expect("a valid directive")),
    };
    // Through the pipe: no request waits on a slow or stuck stderr.
    let pipe = pipe::stderr_pipe();
    let builder = tracing_subscriber::fmt().with_writer(pipe);
    let _ = match config.format {
        LogFormat::Text => {
            // The request's span off: `TextLine` writes its id from the thread.
            let directive = format!("{REQUEST_SPAN_TARGET}=off").parse().expect("a valid directive");
            let ansi = std::io::stderr().is_terminal();
            let installed = builder
                .with_env_filter(filter.add_directive(directive))
                .fmt_fields(LogFields::default())
                .with_ansi(ansi)
                .event_format(line::TextLine)
                .try_init();
            if installed.is_ok() {
                // Ours is the subscriber: access lines can skip `tracing`.
                access::write_directly(pipe, ansi);
            }
            installed
        }
        // Kept on here: log shippers read the id from the span's object.
        LogFormat::Json => builder
            .with_env_filter(filter)
            .json()
            .with_timer(clock::LineTime)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Formats a log event's fields as `tracing-subscriber`'s default does
/// (`message key=value ...`), but safe to give values a client controls:
/// newlines, carriage returns, tabs, escape sequences and every other
/// control or bidirectional-override character are written escaped
/// (`\n`, `\u{1b}`), and each value is cut after [`LogFields::max_len`]
/// bytes with a note of how much was left out. One event is always one line.
///
/// [`init_logging`] uses it; an app with a subscriber of its own can too.
///
/// # Examples
///
/// ```
/// let subscriber = tracing_subscriber::fmt()
///     .fmt_fields(fastlane::LogFields::default())
///     .with_writer(std::io::stderr)
///     .finish();
/// # let _ = subscriber;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct LogFields {
    max_len: usize,
}

impl Default for LogFields {
    /// Values up to 1 KiB: a stall report or a request line fits whole, a
    /// pasted document does not.
    fn default() -> Self {
        Self { max_len: 1024 }
    }
}

impl LogFields {
    /// Cuts each value after `max_len` bytes of output (at least 16).
    #[must_use]
    pub fn max_len(self, max_len: usize) -> Self {
        Self { max_len: max_len.max(16) }
    }
}

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor { writer, max_len: self.max_len, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'writer> {
    writer: Writer<'writer>,
    max_len: usize,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        self.result = self.write_field(field, value);
    }

    fn write_field(&mut self, field: &Field, value: fmt::Arguments<'_>) -> fmt::Result {
        if !self.first {
            self.writer.write_char(' ')?;
        }
        self.first = false;
        let name = field.name();
        // `r#type` fields are named `type` in the output, as tracing does.
        let name = name.strip_prefix("r#").unwrap_or(name);
        if name != "message" && !name.starts_with("log.") {
            write!(self.writer, "{name}=")?;
        }
        let mut escaped = Escaped { out: &mut self.writer, left: self.max_len, dropped: 0 };
        escaped.write_fmt(value)?;
        let dropped = escaped.dropped;
        if dropped > 0 {
            write!(self.writer, "…[{dropped} more bytes]")?;
        }
        Ok(())
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"));
        } else {
            // Quoted, as tracing's default format writes strings.
            self.write(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

/// Writes through to `out`, escaping what must not reach a log line as it
/// is, up to `left` bytes; counts what it leaves out.
struct Escaped<'a, W: fmt::Write> {
    out: &'a mut W,
    left: usize,
    dropped: usize,
}

/// Characters written escaped: controls (C0, DEL, C1: newlines, escape
/// sequences), the Unicode line and paragraph separators, and the
/// bidirectional overrides that make text read differently than it is.
fn must_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // The usual case, a short clean piece, goes through as it is
        // (printable ASCII is checked byte by byte first: no decoding).
        if s.len() <= self.left
            && (s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(must_escape))
        {
            self.left -= s.len();
            return self.out.write_str(s);
        }
        for (at, c) in s.char_indices() {
            // `\n`, `\r`, `\t`, `\u{1b}`, `\u{2028}`: Rust's own escapes.
            let escaped = must_escape(c).then(|| c.escape_default());
            let len = escaped.as_ref().map_or(c.len_utf8(), ExactSizeIterator::len);
            if len > self.left {
                self.left = 0;
                self.dropped += s.len() - at;
                return Ok(());
            }
            self.left -= len;
            match escaped {
                Some(escaped) => write!(self.out, "{escaped}")?,
                None => self.out.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A duration as a log line shows it: rounded milliseconds below a second
/// (`0.42ms`, `3.1ms`, `250ms`), seconds below a minute (`1.5s`), minutes
/// and seconds beyond (`2m05s`); never `1.5483e-5`. Exported as
/// `fastlane::HumanDuration`, for the logs of crates built on fastlane.
#[derive(Debug, Clone, Copy)]
pub struct Human(pub std::time::Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1000.0;
        match ms {
            ms if ms < 1.0 => write!(f, "{ms:.2}ms"),
            ms if ms < 10.0 => write!(f, "{ms:.1}ms"),
            ms if ms < 1000.0 => write!(f, "{ms:.0}ms"),
            ms if ms < 60_000.0 => write!(f, "{:.1}s", ms / 1000.0),
            _ => {
                let secs = self.0.as_secs();
                write!(f, "{}m{:02}s", secs / 60, secs % 60)
            }
        }
    }
}

/// What a subscriber wrote, kept in memory for the tests of the line
/// formats (`line.rs`, `access.rs`).
#[cfg(test)]
#[derive(Clone, Default)]
struct Written(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Written {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[cfg(test)]
impl std::io::Write for Written {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Written {
    type Writer = Written;
    fn make_writer(&'a self) -> Written {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_milliseconds_seconds_or_minutes() {
        use std::time::Duration;
        let show = |d: Duration| Human(d).to_string();
        assert_eq!(show(Duration::from_nanos(15_483)), "0.02ms");
        assert_eq!(show(Duration::from_micros(3_140)), "3.1ms");
        assert_eq!(show(Duration::from_micros(250_400)), "250ms");
        assert_eq!(show(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(show(Duration::from_secs(125)), "2m05s");
    }

    fn escape(value: &str, max_len: usize) -> String {
        let mut out = String::new();
        let mut escaped = Escaped { out: &mut out, left: max_len, dropped: 0 };
        escaped.write_str(value).unwrap();
        let dropped = escaped.dropped;
        if dropped > 0 {
            out.push_str(&format!("…[{dropped} more bytes]"));
        }
        out
    }

    #[test]
    fn control_characters_are_escaped_and_clean_text_is_untouched() {
        assert_eq!(escape("GET /users/{id} 200 1.3ms", 100), "GET /users/{id} 200 1.3ms");
        assert_eq!(
            escape("x\n2026-11-26T00:00:00.000000Z ERROR fastlane::server: FAKE", 100),
            "x\\n2026-11-26T00:00:00.000000Z ERROR fastlane::server: FAKE"
        );
        assert_eq!(escape("a\r\tb\u{1b}[31mred\u{7f}", 100), "a\\r\\tb\\u{1b}[31mred\\u{7f}");
        assert_eq!(escape("ok\u{2028}no\u{202e}rev", 100), "ok\\u{2028}no\\u{202e}rev");
        assert_eq!(escape("naïve 東京", 100), "naïve 東京");
    }

    #[test]
    fn long_values_are_cut_and_say_how_much_was_left_out() {
        let long = "a".repeat(2_000_000);
        assert_eq!(escape(&long, 10), format!("aaaaaaaaaa…[{} more bytes]", 2_000_000 - 10));
        // Never in the middle of a character or an escape.
        assert_eq!(escape("ab東京", 4), "ab…[6 more bytes]");
        assert_eq!(escape("ab\ncd", 3), "ab…[3 more bytes]");
    }
}

//! The text log line [`init_logging`](super::init_logging) writes: what
//! `tracing-subscriber`'s default (`Full`) format writes, with the request's
//! id taken from the thread instead of from a span.
//!
//! `2026-11-27T10:00:00.123456Z  WARN request{id=4bf9...}: app: message k=v`
//!
//! Every request's handler is polled under a `request{id}` span so that its
//! events carry the id. Making, entering and leaving that span on every
//! request, and formatting its field into the subscriber's span store,
//! measured 1 to 3 µs of CPU per request: 6 to 18 % of all fastlane spends on
//! a hello-world request. But the id is already at hand without it: while a
//! handler or a background task is polled it is the thread's current one
//! ([`RequestId::current`]). So the subscriber `init_logging` installs turns
//! the span off (by its target, [`REQUEST_SPAN_TARGET`]) and this format
//! writes `request{id=...}:` where the span's name and field would have
//! been. The lines read as before; the span is still made for an app that
//! installs its own subscriber (to export traces, say).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::clock::LineTime;
use crate::request_id::RequestId;

/// The target of the `request{id}` span (see the module's doc).
pub(crate) use crate::request_id::SPAN_TARGET as REQUEST_SPAN_TARGET;

/// Terminal colours, as `tracing-subscriber` uses them (bold span names,
/// dimmed timestamp, punctuation and target, a colour per level).
const BOLD: &str = "\x1b[1m";
const DIMMED: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Writes log lines as described in the module's doc.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TextLine;

/// Writes `text` in `style` if `ansi` (the line takes colours), plain
/// otherwise.
fn paint(writer: &mut Writer<'_>, ansi: bool, style: &str, text: &str) -> fmt::Result {
    match ansi {
        true => write!(writer, "{style}{text}{RESET}"),
        false => writer.write_str(text),
    }
}

/// The start of every line: `2026-11-27T10:00:00.123456Z  INFO `.
pub(super) fn write_start(writer: &mut Writer<'_>, level: Level, ansi: bool) -> fmt::Result {
    if ansi {
        writer.write_str(DIMMED)?;
    }
    LineTime.format_time(writer)?;
    if ansi {
        writer.write_str(RESET)?;
    }
    writer.write_char(' ')?;
    let (level, colour) = level_text(level);
    paint(writer, ansi, colour, level)?;
    writer.write_char(' ')
}

/// The target, before the fields: `fastlane::request: `.
pub(super) fn write_target(writer: &mut Writer<'_>, target: &str, ansi: bool) -> fmt::Result {
    paint(writer, ansi, DIMMED, target)?;
    paint(writer, ansi, DIMMED, ":")?;
    writer.write_char(' ')
}

fn level_text(level: Level) -> (&'static str, &'static str) {
    // Right-aligned to five characters, as `tracing-subscriber` writes it.
    match level {
        Level::TRACE => ("TRACE", "\x1b[35m"),
        Level::DEBUG => ("DEBUG", "\x1b[34m"),
        Level::INFO => (" INFO", "\x1b[32m"),
        Level::WARN => (" WARN", "\x1b[33m"),
        Level::ERROR => ("ERROR", "\x1b[31m"),
    }
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let ansi = writer.has_ansi_escapes();
        write_start(&mut writer, *meta.level(), ansi)?;

        // The request first: its span, when it was on, was the outermost.
        let mut spans = RequestId::with_current(|id| match id {
            Some(id) => {
                paint(&mut writer, ansi, BOLD, "request{")?;
                write!(writer, "id={id}")?;
                paint(&mut writer, ansi, BOLD, "}")?;
                paint(&mut writer, ansi, DIMMED, ":")?;
                Ok(true)
            }
            None => Ok::<_, fmt::Error>(false),
        })?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                paint(&mut writer, ansi, BOLD, span.metadata().name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                    paint(&mut writer, ansi, BOLD, "{")?;
                    writer.write_str(fields)?;
                    paint(&mut writer, ansi, BOLD, "}")?;
                }
                paint(&mut writer, ansi, DIMMED, ":")?;
                spans = true;
            }
        }
        if spans {
            writer.write_char(' ')?;
        }
        write_target(&mut writer, meta.target(), ansi)?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Written;
    use super::*;
    use crate::LogFields;

    /// Logs the same events under `tracing-subscriber`'s `Full` format with
    /// the span on and under [`TextLine`] with it off; the lines without
    /// their timestamps.
    fn both(log: impl Fn()) -> (String, String) {
        let (theirs, ours) = (Written::default(), Written::default());
        let full = tracing_subscriber::fmt()
            .fmt_fields(LogFields::default())
            .with_ansi(false)
            .with_writer(theirs.clone())
            .finish();
        tracing::subscriber::with_default(full, &log);
        let filter = tracing_subscriber::EnvFilter::new(format!("info,{REQUEST_SPAN_TARGET}=off"));
        let line = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .fmt_fields(LogFields::default())
            .with_ansi(false)
            .event_format(TextLine)
            .with_writer(ours.clone())
            .finish();
        tracing::subscriber::with_default(line, &log);
        let strip = |text: String| text.lines().map(|l| l[28..].to_owned() + "\n").collect::<String>();
        (strip(theirs.text()), strip(ours.text()))
    }

    #[test]
    fn lines_read_as_tracing_subscribers_own_with_the_request_span() {
        let id = RequestId::new();
        let (theirs, ours) = both(|| {
            tracing::info!(target: "app", "outside any request");
            let span = id.span();
            let _span = span.enter();
            let _current = id.enter();
            tracing::warn!(user = "ann\nforged", n = 3, "in the handler");
            let inner = tracing::info_span!("db", table = "users");
            inner.in_scope(|| tracing::error!("under a span of the app's"));
        });
        assert_eq!(ours, theirs);
        assert!(ours.contains(&format!(
            " WARN request{{id={id}}}: fastlane::telemetry::line::tests: in the handler"
        )));
        assert!(ours.contains(&format!("ERROR request{{id={id}}}:db{{table=\"users\"}}: ")), "{ours}");
        assert!(ours.contains("user=\"ann\\nforged\" n=3"), "{ours}");
    }

    #[test]
    fn the_request_span_costs_nothing_where_the_line_writes_the_id() {
        let filter = tracing_subscriber::EnvFilter::new(format!("trace,{REQUEST_SPAN_TARGET}=off"));
        let subscriber = tracing_subscriber::fmt().with_env_filter(filter).event_format(TextLine).finish();
        tracing::subscriber::with_default(subscriber, || assert!(RequestId::new().span().is_disabled()));
    }
}

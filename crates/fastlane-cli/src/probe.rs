//! `fastlane probe`: send requests concurrently, show when each ran, and say
//! whether they overlapped — the script every reader of the seed articles
//! writes by hand with httpx and `asyncio.gather`.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use crate::{out, outln};

/// What to send.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The URLs, used in turn (request i goes to `urls[i % urls.len()]`).
    pub urls: Vec<String>,
    /// How many requests in all.
    pub total: usize,
    /// How many may be in flight at once.
    pub concurrency: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Which URL.
    pub url: String,
    /// When it was sent, from the start of the probe.
    pub start: Duration,
    /// When its whole response had arrived (or it failed).
    pub end: Duration,
    /// The status, or the error.
    pub outcome: Result<u16, String>,
}

impl Sample {
    /// How long it took.
    pub fn duration(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }
}

/// All the samples, in the order the requests were sent.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// One per request.
    pub samples: Vec<Sample>,
    /// From the first send to the last response.
    pub wall: Duration,
    /// How many requests the probe let be in flight at once (`-c`).
    pub concurrency: usize,
}

/// Sends the requests and collects their timings.
pub async fn run(config: &ProbeConfig) -> ProbeResult {
    let bar = if config.progress { ProgressBar::new(config.total as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} responses")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let origin = Instant::now();
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut handles = Vec::with_capacity(config.total);
    for i in 0..config.total {
        let url = config.urls[i % config.urls.len()].clone();
        let permits = permits.clone();
        let bar = bar.clone();
        let timeout = config.timeout;
        handles.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let start = origin.elapsed();
            let outcome = match tokio::time::timeout(timeout, fastlane::client::get(&url)).await {
                Ok(Ok(response)) => Ok(response.status.as_u16()),
                Ok(Err(err)) => Err(fastlane::ErrorChain(&err).to_string()),
                Err(_) => Err(format!("timed out after {:.1} s", timeout.as_secs_f64())),
            };
            let end = origin.elapsed();
            bar.inc(1);
            Sample { url, start, end, outcome }
        }));
    }
    let mut samples = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.await {
            Ok(sample) => samples.push(sample),
            Err(err) => samples.push(Sample {
                url: String::new(),
                start: Duration::ZERO,
                end: origin.elapsed(),
                outcome: Err(format!("probe task failed: {err}")),
            }),
        }
    }
    bar.finish_and_clear();
    let wall = samples.iter().map(|s| s.end).max().unwrap_or_default();
    ProbeResult { samples, wall, concurrency: config.concurrency.max(1) }
}

/// The most intervals open at the same moment. An end at the same instant as
/// a start counts first, so back-to-back is not overlap.
fn max_open(intervals: impl Iterator<Item = (Duration, Duration)>) -> usize {
    let mut events: Vec<(Duration, i32)> = Vec::new();
    for (start, end) in intervals {
        events.push((start, 1));
        events.push((end, -1));
    }
    events.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        max = max.max(now);
    }
    usize::try_from(max).unwrap_or(0)
}

impl ProbeResult {
    /// The most requests that were in flight at the same moment, as the
    /// client saw them (sent and not yet answered).
    pub fn max_overlap(&self) -> usize {
        max_open(self.samples.iter().map(|s| (s.start, s.end)))
    }

    /// The most requests the *server* worked on at the same moment.
    ///
    /// A client only sees when a request was sent and answered; a request that
    /// waited behind another (a blocked event loop) looks in flight all along.
    /// So each request's time on the server is estimated as the time the
    /// fastest request to the same URL took, ending when it was answered; 10 %
    /// of it is left out so that timing jitter does not pass for overlap.
    pub fn served_overlap(&self) -> usize {
        let mut fastest: std::collections::HashMap<&str, Duration> = std::collections::HashMap::new();
        for s in self.samples.iter().filter(|s| s.outcome.is_ok()) {
            let d = fastest.entry(s.url.as_str()).or_insert(s.duration());
            *d = (*d).min(s.duration());
        }
        max_open(self.samples.iter().filter(|s| s.outcome.is_ok()).map(|s| {
            let service = fastest[s.url.as_str()].mul_f64(0.9);
            (s.end.saturating_sub(service), s.end)
        }))
    }

    /// One line that says whether the requests ran in parallel.
    pub fn verdict(&self) -> String {
        let n = self.samples.len();
        let sum: Duration = self.samples.iter().map(Sample::duration).sum();
        let in_flight = self.max_overlap();
        let served = self.served_overlap();
        let failed = self.samples.iter().filter(|s| s.outcome.is_err()).count();
        let wall = self.wall.as_secs_f64();
        let mut line = if n < 2 {
            "one request: nothing to compare".to_owned()
        } else if served > 1 {
            format!(
                "overlapped (ran in parallel): up to {served} served at once; total {wall:.2} s against {:.2} s if one after another",
                sum.as_secs_f64()
            )
        } else if self.concurrency == 1 {
            format!(
                "ran one after another because -c 1 sends one request at a time: the client serialised them, \
                 not the server; total {wall:.2} s. Use -c {n} to see whether the server runs them in parallel"
            )
        } else if in_flight > 1 {
            format!(
                "ran one after another: sent together (up to {in_flight} in flight), but the server answered them in turn; \
                 total {wall:.2} s, each waiting for the one before"
            )
        } else {
            format!(
                "ran one after another: never more than one in flight; total {wall:.2} s = the sum of their durations ({:.2} s)",
                sum.as_secs_f64()
            )
        };
        if failed > 0 {
            let _ = write!(line, "; {failed} of {n} failed");
        }
        line
    }

    /// The per-request table.
    pub fn table(&self) -> String {
        let width = self.samples.iter().map(|s| s.url.len()).max().unwrap_or(3).clamp(3, 60);
        let mut out =
            format!("{:>4}  {:<width$}  {:>9}  {:>9}  {:>9}  status\n", "#", "url", "start", "end", "took");
        for (i, s) in self.samples.iter().enumerate() {
            let status = match &s.outcome {
                Ok(code) => code.to_string(),
                Err(err) => format!("error: {err}"),
            };
            let _ = writeln!(
                out,
                "{:>4}  {:<width$}  {:>8.3}s  {:>8.3}s  {:>8.3}s  {status}",
                i + 1,
                s.url,
                s.start.as_secs_f64(),
                s.end.as_secs_f64(),
                s.duration().as_secs_f64()
            );
        }
        out
    }

    /// A timeline chart: one bar (`<rect>`) per request on a time axis,
    /// each labelled with its URL, status and duration (beside the bar when
    /// the bar is too short to hold it), under the verdict, with a legend
    /// of the colours and a caption on the axis.
    pub fn svg(&self) -> String {
        const LEFT: f64 = 40.0;
        const WIDTH: f64 = 760.0;
        const ROW: f64 = 22.0;
        // The verdict, wrapped to the chart's width (about 100 characters
        // at font-size 14), then the legend, then the bars.
        let verdict = wrap(&self.verdict(), 100);
        let extra = 18.0 * (verdict.len().max(1) - 1) as f64;
        let legend_y = 32.0 + extra;
        let top = 62.0 + extra;
        /// A rough width of one character at font-size 12, to tell whether a
        /// label fits inside its bar.
        const CHAR: f64 = 6.8;
        let span = self.wall.as_secs_f64().max(0.001);
        let rows = self.samples.len();
        let height = top + ROW * rows as f64 + 52.0;
        let x = |t: Duration| LEFT + t.as_secs_f64() / span * WIDTH;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="sans-serif" font-size="12">"#,
            w = LEFT + WIDTH + 40.0
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        for (i, line) in verdict.iter().enumerate() {
            let _ = writeln!(
                svg,
                r#"<text x="{LEFT}" y="{}" font-size="14">{}</text>"#,
                20.0 + 18.0 * i as f64,
                escape(line)
            );
        }
        // The legend: what the colours mean.
        let mut lx = LEFT;
        for (color, meaning) in
            [(OK, "answered (< 400)"), (CLIENT_ERROR, "4xx"), (FAILED, "5xx, error or timeout")]
        {
            let _ = writeln!(
                svg,
                r#"<rect x="{lx:.1}" y="{legend_y}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{}">{}</text>"#,
                lx + 16.0,
                legend_y + 10.0,
                escape(meaning)
            );
            lx += 16.0 + meaning.len() as f64 * CHAR + 18.0;
        }
        // Time axis with about eight ticks at a round step, and its caption.
        let step = nice_step(span / 8.0);
        let axis_y = top + ROW * rows as f64 + 8.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#333"/>"##,
            LEFT + WIDTH
        );
        let mut t = 0.0;
        while t <= span + 1e-9 {
            let tx = LEFT + t / span * WIDTH;
            let _ = writeln!(
                svg,
                r##"<line x1="{tx:.1}" y1="{top}" x2="{tx:.1}" y2="{axis_y}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                axis_y + 16.0,
                format_secs(t)
            );
            t += step;
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">time since the first request was sent; each bar is one request, from sent to answered</text>"##,
            LEFT + WIDTH / 2.0,
            axis_y + 36.0
        );
        for (i, s) in self.samples.iter().enumerate() {
            let y = top + ROW * i as f64 + 3.0;
            let x0 = x(s.start);
            let w = (x(s.end) - x0).max(1.0);
            let color = match s.outcome {
                Ok(code) if code < 400 => OK,
                Ok(code) if code < 500 => CLIENT_ERROR,
                _ => FAILED,
            };
            let outcome = match &s.outcome {
                Ok(code) => format!("{code} {:.3}s", s.duration().as_secs_f64()),
                Err(_) => format!("error {:.3}s", s.duration().as_secs_f64()),
            };
            let label = format!("{} {outcome}", short_url(&s.url));
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">#{}</text><rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{color}"><title>{}</title></rect>"#,
                LEFT - 6.0,
                y + 13.0,
                i + 1,
                ROW - 6.0,
                escape(&format!("{} — {outcome}", s.url)),
            );
            // Inside the bar in white when it fits; else beside it (or, at
            // the right edge, before it) in the bar's colour.
            let text_width = label.chars().count() as f64 * CHAR + 8.0;
            let (lx, anchor, fill) = if text_width <= w {
                (x0 + 4.0, "start", "white")
            } else if x0 + w + 4.0 + text_width <= LEFT + WIDTH + 40.0 {
                (x0 + w + 4.0, "start", "#222")
            } else {
                (x0 - 4.0, "end", "#222")
            };
            let _ = writeln!(
                svg,
                r#"<text x="{lx:.1}" y="{:.1}" text-anchor="{anchor}" fill="{fill}">{}</text>"#,
                y + 13.0,
                escape(&label)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// The colours of the bars.
const OK: &str = "#2e8b57";
const CLIENT_ERROR: &str = "#e69500";
const FAILED: &str = "#c0392b";

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

/// A URL as a bar's label: its path and query, cut to 48 characters.
fn short_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    if path.chars().count() <= 48 {
        return path.to_owned();
    }
    let cut: String = path.chars().take(47).collect();
    format!("{cut}…")
}

fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-3);
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let nice = if normalized <= 1.0 {
        1.0
    } else if normalized <= 2.0 {
        2.0
    } else if normalized <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn format_secs(t: f64) -> String {
    if t == 0.0 {
        "0".to_owned()
    } else if t < 1.0 {
        format!("{:.0}ms", t * 1000.0)
    } else {
        format!("{t:.1}s")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start_ms: u64, end_ms: u64) -> Sample {
        Sample {
            url: "http://x/".into(),
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(end_ms),
            outcome: Ok(200),
        }
    }

    #[test]
    fn overlapping_requests_are_called_parallel() {
        let r = ProbeResult {
            samples: vec![sample(0, 2000), sample(5, 2005)],
            wall: Duration::from_millis(2005),
            concurrency: 2,
        };
        assert_eq!((r.max_overlap(), r.served_overlap()), (2, 2));
        assert!(r.verdict().starts_with("overlapped"), "{}", r.verdict());
        let svg = r.svg();
        assert_eq!(svg.matches("<rect x=").count(), 2 + 3, "two bars and the legend's three keys: {svg}");
    }

    #[test]
    fn requests_sent_together_but_answered_in_turn_are_called_serial() {
        // FastAPI with a blocking `async def`: both sent at 0, answered at 2 s and 4 s.
        let r = ProbeResult {
            samples: vec![sample(0, 2003), sample(1, 4005)],
            wall: Duration::from_millis(4005),
            concurrency: 2,
        };
        assert_eq!((r.max_overlap(), r.served_overlap()), (2, 1));
        assert!(r.verdict().starts_with("ran one after another: sent together"), "{}", r.verdict());
    }

    #[test]
    fn back_to_back_requests_are_called_serial() {
        let r = ProbeResult {
            samples: vec![sample(0, 2000), sample(2000, 4000)],
            wall: Duration::from_millis(4000),
            concurrency: 2,
        };
        assert_eq!(r.max_overlap(), 1);
        assert!(r.verdict().starts_with("ran one after another"), "{}", r.verdict());
        // With -c 1 the client itself sent them one by one, and says so.
        let r = ProbeResult { concurrency: 1, ..r };
        assert!(r.verdict().contains("-c 1 sends one request at a time"), "{}", r.verdict());
        assert!(r.verdict().contains("Use -c 2"), "{}", r.verdict());
        // A verdict this long is wrapped to the chart's width.
        let svg = r.svg();
        assert!(svg.matches(r#"font-size="14">"#).count() >= 2, "{svg}");
    }

    #[test]
    fn every_bar_is_labelled_with_its_url_and_the_chart_explains_itself() {
        let long = format!("http://127.0.0.1:8000/slow/sync?secs=2&pad={}", "x".repeat(80));
        let r = ProbeResult {
            samples: vec![
                Sample { url: "http://127.0.0.1:8000/test1".into(), ..sample(0, 3) },
                Sample { url: long, ..sample(0, 2000) },
                Sample {
                    url: "http://127.0.0.1:8000/gone".into(),
                    outcome: Err("refused".into()),
                    ..sample(1990, 2000)
                },
            ],
            wall: Duration::from_millis(2000),
            concurrency: 3,
        };
        let svg = r.svg();
        // A 3 ms bar is a sliver: its label goes beside it, in dark text.
        assert!(svg.contains(r##"text-anchor="start" fill="#222">/test1 200 0.003s</text>"##), "{svg}");
        // A long bar holds its label; a long URL is cut at 48 characters.
        assert!(
            svg.contains(
                r#"fill="white">/slow/sync?secs=2&amp;pad=xxxxxxxxxxxxxxxxxxxxxxxxx… 200 2.000s</text>"#
            ),
            "{svg}"
        );
        // A short bar at the right edge is labelled before it.
        assert!(svg.contains(r##"text-anchor="end" fill="#222">/gone error 0.010s</text>"##), "{svg}");
        assert!(svg.contains("answered (&lt; 400)") && svg.contains("5xx, error or timeout"), "{svg}");
        assert!(svg.contains("time since the first request was sent"), "{svg}");
        // Every `<` opens a tag: text that needs escaping was escaped.
        for (i, _) in svg.match_indices('<') {
            let next = svg[i + 1..].chars().next().unwrap();
            assert!(next.is_ascii_alphabetic() || next == '/', "a bare `<` at {i}: {svg}");
        }
        // Every bar has a label naming its URL.
        assert_eq!(svg.matches("<rect x=").count(), 3 + 3, "three bars and three legend keys: {svg}");
    }
}

/// The flags of `fastlane probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeCommand {
    /// Requests to send in all (default: one per URL).
    #[arg(short = 'n', long = "total", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub total: Option<u32>,
    /// Requests in flight at once (default: all of them).
    #[arg(short = 'c', long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: Option<u32>,
    /// Seconds before a request counts as failed.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Write a timeline chart (SVG, one bar per request) to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
    /// URLs to request (http:// only), used in turn.
    #[arg(required = true, value_name = "URL")]
    pub urls: Vec<String>,
}

/// Runs `fastlane probe`: the table, the verdict and the chart; exit code 1
/// if a request failed.
pub async fn run_command(command: ProbeCommand) -> ExitCode {
    let ProbeCommand { total, concurrency, timeout, svg, urls } = command;
    let total = total.map_or(urls.len(), |n| n as usize);
    let config = ProbeConfig {
        concurrency: concurrency.map_or(total, |c| c as usize),
        urls,
        total,
        timeout: Duration::from_secs(timeout),
        progress: true,
    };
    for url in &config.urls {
        if !url.starts_with("http://") {
            eprintln!("fastlane probe: `{url}` is not an http:// URL (https is not supported)");
            return ExitCode::from(2);
        }
    }
    let result = run(&config).await;
    out!("{}", result.table());
    outln!("\n{}", result.verdict());
    if let Some(path) = svg {
        if let Err(err) = std::fs::write(&path, result.svg()) {
            eprintln!("fastlane probe: could not write --svg {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        outln!("timeline written to {}", path.display());
    }
    if result.samples.iter().all(|s| s.outcome.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

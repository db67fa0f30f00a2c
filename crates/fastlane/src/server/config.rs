//! The server's settings: [`Config`] (a field per limit) and [`ServeArgs`],
//! the same as command-line flags named as uvicorn's and gunicorn's.

use std::time::Duration;

use crate::{IsolationConfig, LaneConfig};

/// How a [`Server`](crate::Server) listens and what limits it applies.
///
/// Every limit has a default chosen for a public-facing API server, and a
/// reason, given on each field. Build one in code, or from command-line flags
/// with [`ServeArgs`](crate::ServeArgs).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let config = fastlane::Config {
///     port: 8080,
///     request_timeout: Some(Duration::from_secs(10)),
///     ..fastlane::Config::default()
/// };
/// assert_eq!(config.host, "127.0.0.1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1`: reachable from this machine
    /// only until you choose otherwise (`0.0.0.0` for all interfaces).
    pub host: String,
    /// Port to listen on; `0` picks a free one. Default `8000`, as uvicorn.
    pub port: u16,
    /// Time a handler has to produce its response headers before the client
    /// gets `504`. Default 60 s: longer than any interactive request should
    /// take (long work belongs in background tasks or jobs), short enough
    /// that a stuck request does not hold a connection for ever. `None`
    /// disables it; [`RouteTimeout`](crate::RouteTimeout) sets it per route.
    pub request_timeout: Option<Duration>,
    /// Time a client has to send the request headers, and the longest an
    /// idle keep-alive connection stays open. Default 10 s: a real client
    /// sends them in one go, a slowloris attacker never finishes. Measured
    /// to a tenth of a second (it is checked ten times a second).
    ///
    /// On HTTP/2 connections it is the time a client has to finish its
    /// preface and first SETTINGS, a frame header, or a header block once
    /// begun (the connection is cut otherwise), and the longest a connection
    /// stays with no stream open (it is then sent GOAWAY). Without isolation
    /// these are checked every quarter of the timeout, so they may take up
    /// to 1.25 times it.
    pub header_read_timeout: Duration,
    /// Largest request body accepted, in bytes, answered `413` beyond.
    /// Default 2 MiB, as axum: enough for JSON APIs; raise it for uploads.
    pub body_limit: usize,
    /// How long a graceful shutdown waits for in-flight requests and
    /// background tasks before it cuts them and reports what was cut.
    /// Default 30 s, as gunicorn's `--graceful-timeout` and Kubernetes'
    /// termination grace period.
    pub grace_period: Duration,
    /// Sizes of the blocking and CPU lanes.
    pub lanes: LaneConfig,
    /// Isolation of `async fn` handlers that block by mistake.
    pub isolation: IsolationConfig,
    /// Worker processes. Default 1: one process, no supervisor. Above 1, a
    /// supervisor process binds the port and runs this many copies of the
    /// program that share it (see `--workers`). Each has its own memory:
    /// share state through a database or durable jobs, not statics.
    pub workers: usize,
    /// With workers: a worker whose I/O runtime has not answered its
    /// heartbeat for this long is hung and is replaced. Default 30 s, as
    /// gunicorn's `--timeout`; unlike gunicorn's, a slow or blocking handler
    /// never makes a worker miss its heartbeat. A worker that has not
    /// answered its first heartbeat yet is still starting and gets this or
    /// 30 s, whichever is longer.
    pub worker_timeout: Duration,
    /// With workers: recycle a worker after it has served about this many
    /// requests (checked twice a second), as gunicorn's `--max-requests`.
    pub max_requests: Option<u64>,
    /// With workers: add a random 0..=jitter to `max_requests` per worker,
    /// so that workers do not all recycle at once.
    pub max_requests_jitter: u64,
    /// Serve `GET /metrics` (Prometheus) on the app's own address. Default
    /// off: it reveals route names and load to whoever can reach the port.
    /// The demo turns it on.
    pub expose_internal: bool,
    /// Compress responses of 1 KiB or more with gzip, brotli or zstd, as
    /// the client's `Accept-Encoding` prefers. Default off (a proxy in front
    /// often does it). Never: images, gRPC, server-sent events
    /// (`text/event-stream`, whose events must not wait in a compressor's
    /// buffer), or a response that already has a `Content-Encoding` (a
    /// handler that sets `Content-Encoding: identity` opts out).
    pub compression: bool,
    /// Take the client's address and scheme from `X-Forwarded-For` /
    /// `X-Forwarded-Proto` (or `Forwarded`) when the peer is one of
    /// `forwarded_allow_ips`; see [`ClientInfo`](crate::ClientInfo). Default
    /// on, as uvicorn's `--proxy-headers`: with the default trust list only a
    /// proxy on this machine is believed.
    pub proxy_headers: bool,
    /// The peers whose proxy headers are believed. Default `127.0.0.1`, as
    /// uvicorn and gunicorn.
    pub forwarded_allow_ips: crate::ForwardedAllowIps,
    /// Serve HTTPS with this certificate and key (HTTP/2 offered by ALPN,
    /// HTTP/1.1 otherwise). Default `None`: plain HTTP, as behind a proxy
    /// that terminates TLS. SIGHUP reloads both files: new connections get
    /// the new certificate, open ones keep theirs.
    pub tls: Option<TlsConfig>,
}

/// The PEM files of a server's certificate and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, the server's own certificate first (uvicorn's
    /// `--ssl-certfile`).
    pub certfile: std::path::PathBuf,
    /// Its private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (uvicorn's
    /// `--ssl-keyfile`).
    pub keyfile: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 8000,
            request_timeout: Some(Duration::from_secs(60)),
            header_read_timeout: Duration::from_secs(10),
            body_limit: 2 * 1024 * 1024,
            grace_period: Duration::from_secs(30),
            lanes: LaneConfig::default(),
            isolation: IsolationConfig::default(),
            workers: 1,
            worker_timeout: Duration::from_secs(30),
            max_requests: None,
            max_requests_jitter: 0,
            expose_internal: false,
            compression: false,
            proxy_headers: true,
            forwarded_allow_ips: crate::ForwardedAllowIps::default(),
            tls: None,
        }
    }
}

impl Config {
    /// Checks the values that can be wrong; the error names the setting.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |what: &str| Err(crate::Error::Config(what.to_owned()));
        if self.lanes.blocking_threads == 0 {
            return bad("lanes.blocking_threads must be at least 1");
        }
        if self.lanes.cpu_threads == 0 {
            return bad("lanes.cpu_threads must be at least 1");
        }
        if !(0..=19).contains(&self.lanes.cpu_nice) {
            return bad("lanes.cpu_nice must be between 0 and 19");
        }
        if self.isolation.stall_threshold.is_zero() {
            return bad("isolation.stall_threshold must be more than 0");
        }
        if self.isolation.max_threads <= self.isolation.runners {
            return bad("isolation.max_threads must be more than isolation.runners");
        }
        if self.workers == 0 {
            return bad("workers must be at least 1");
        }
        if self.worker_timeout.is_zero() {
            return bad("worker_timeout must be more than 0");
        }
        if self.header_read_timeout.is_zero() {
            return bad("header_read_timeout must be more than 0");
        }
        if self.request_timeout.is_some_and(|t| t.is_zero()) {
            return bad("request_timeout must be more than 0 (use None to disable it)");
        }
        Ok(())
    }
}

/// Command-line flags for a server's [`Config`], to `#[command(flatten)]` into
/// an app's own clap arguments. Every flag also reads a `FASTLANE_*`
/// environment variable.
///
/// # Examples
///
/// ```
/// use clap::Parser;
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     serve: fastlane::ServeArgs,
/// }
///
/// let cli = Cli::try_parse_from(["app", "--port", "9000", "--blocking-threads", "8"])?;
/// let config = cli.serve.into_config();
/// assert_eq!((config.port, config.lanes.blocking_threads), (9000, 8));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "FASTLANE_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free port [default: 8000].
    #[arg(long, short, env = "FASTLANE_PORT")]
    pub port: Option<u16>,
    /// Address and port as HOST:PORT, as gunicorn's --bind (instead of --host and --port).
    #[arg(long, short = 'b', value_name = "HOST:PORT", env = "FASTLANE_BIND", value_parser = parse_bind,
          conflicts_with_all = ["host", "port"])]
    pub bind: Option<(String, u16)>,
    /// Log level: trace, debug, info, warning or error [default: info]. RUST_LOG, when set, overrides
    /// it with a filter of its own (e.g. RUST_LOG=fastlane=debug,sqlx=warn).
    #[arg(long, env = "FASTLANE_LOG_LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<tracing::Level>,
    /// Log a line per request (`GET /users/{id} 200 1.3ms`) [default: on].
    #[arg(long, overrides_with = "no_access_log")]
    pub access_log: bool,
    /// Log no line per request (the other logs stay).
    #[arg(long, env = "FASTLANE_NO_ACCESS_LOG", overrides_with = "access_log")]
    pub no_access_log: bool,
    /// Log lines as text, or as one JSON object each (for a log shipper) [default: text].
    #[arg(long, env = "FASTLANE_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::LogFormat>,
    /// Seconds a handler has to answer before the client gets 504; 0 disables [default: 60].
    #[arg(long, env = "FASTLANE_REQUEST_TIMEOUT", value_parser = parse_secs)]
    pub request_timeout: Option<f64>,
    /// Seconds a client has to send its request headers, and the longest an idle keep-alive
    /// connection stays open (uvicorn's --timeout-keep-alive) [default: 10].
    #[arg(long, visible_alias = "timeout-keep-alive", env = "FASTLANE_HEADER_READ_TIMEOUT",
          value_parser = parse_positive_secs)]
    pub header_read_timeout: Option<f64>,
    /// Seconds a graceful shutdown waits for requests and background tasks [default: 30].
    #[arg(long, visible_aliases = ["graceful-timeout", "timeout-graceful-shutdown"], env = "FASTLANE_GRACE_PERIOD",
          value_parser = parse_secs)]
    pub grace_period: Option<f64>,
    /// Largest request body in bytes [default: 2097152].
    #[arg(long, env = "FASTLANE_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Threads of the blocking lane [default: 64].
    #[arg(long, env = "FASTLANE_BLOCKING_THREADS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub blocking_threads: Option<u32>,
    /// Jobs that may wait for a blocking thread before requests get 503 [default: 128].
    #[arg(long, env = "FASTLANE_BLOCKING_QUEUE")]
    pub blocking_queue: Option<usize>,
    /// Threads of the CPU lane [default: one per core].
    #[arg(long, env = "FASTLANE_CPU_THREADS", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub cpu_threads: Option<u32>,
    /// Jobs that may wait for a CPU thread before requests get 503 [default: 8 per core].
    #[arg(long, env = "FASTLANE_CPU_QUEUE")]
    pub cpu_queue: Option<usize>,
    /// Worker processes under a supervisor; 1 runs a single process [default: 1].
    #[arg(long, short = 'w', env = "FASTLANE_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: Option<u32>,
    /// Seconds a worker's I/O runtime may go without answering before the supervisor replaces it [default: 30].
    #[arg(long, alias = "worker-timeout", env = "FASTLANE_TIMEOUT", value_parser = parse_positive_secs)]
    pub timeout: Option<f64>,
    /// Recycle each worker after about this many requests [default: never].
    #[arg(long, env = "FASTLANE_MAX_REQUESTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: Option<u64>,
    /// Add up to this many requests, at random, to --max-requests per worker [default: 0].
    #[arg(long, env = "FASTLANE_MAX_REQUESTS_JITTER")]
    pub max_requests_jitter: Option<u64>,
    /// Milliseconds one poll of an async handler may take before it counts as a stall [default: 10].
    #[arg(long, env = "FASTLANE_STALL_THRESHOLD_MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub stall_threshold_ms: Option<u64>,
    /// Runner threads kept for healthy async handlers [default: the number of cores].
    #[arg(long, env = "FASTLANE_RUNNERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub runners: Option<u32>,
    /// Most runner threads for async handlers, stuck ones included [default: 256].
    #[arg(long, env = "FASTLANE_MAX_THREADS", value_parser = clap::value_parser!(u32).range(2..=100_000))]
    pub max_threads: Option<u32>,
    /// Serve /metrics and /_fastlane/* (stalls, worker) [default: off in an app, on in the demo]:
    /// they show route names and load to whoever can reach the port.
    #[arg(long, env = "FASTLANE_EXPOSE_INTERNAL")]
    pub expose_internal: bool,
    /// Compress responses of 1 KiB or more (gzip, brotli, zstd by Accept-Encoding) [default: off].
    #[arg(long, env = "FASTLANE_COMPRESSION")]
    pub compression: bool,
    /// Serve HTTPS with this certificate chain (PEM), with --ssl-keyfile; SIGHUP reloads both.
    #[arg(long, env = "FASTLANE_SSL_CERTFILE", value_name = "FILE", requires = "ssl_keyfile")]
    pub ssl_certfile: Option<std::path::PathBuf>,
    /// The private key (PEM) of --ssl-certfile.
    #[arg(long, env = "FASTLANE_SSL_KEYFILE", value_name = "FILE", requires = "ssl_certfile")]
    pub ssl_keyfile: Option<std::path::PathBuf>,
    /// Run async handlers on tokio's workers, without stall isolation (as plain axum).
    #[arg(long, env = "FASTLANE_NO_ISOLATION")]
    pub no_isolation: bool,
    /// Nice value added to CPU-lane threads, 0-19 [default: 10].
    #[arg(long, env = "FASTLANE_CPU_NICE", value_parser = clap::value_parser!(i32).range(0..=19))]
    pub cpu_nice: Option<i32>,
    /// Take the client's address and scheme from X-Forwarded-For / X-Forwarded-Proto (or Forwarded)
    /// sent by a peer in --forwarded-allow-ips [default: on].
    #[arg(long, overrides_with = "no_proxy_headers")]
    pub proxy_headers: bool,
    /// Ignore proxy headers: the client is always the socket's peer.
    #[arg(long, env = "FASTLANE_NO_PROXY_HEADERS", overrides_with = "proxy_headers")]
    pub no_proxy_headers: bool,
    /// Peers whose proxy headers are believed: comma-separated addresses and networks
    /// (10.0.0.0/8), or * for any [default: 127.0.0.1].
    #[arg(long, value_name = "IPS", env = "FORWARDED_ALLOW_IPS")]
    pub forwarded_allow_ips: Option<crate::ForwardedAllowIps>,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        return Err(format!("`{s}` must be between 0 and 86400 seconds"));
    }
    Ok(v)
}

fn parse_bind(s: &str) -> Result<(String, u16), String> {
    let (host, port) =
        s.rsplit_once(':').ok_or_else(|| format!("`{s}` is not HOST:PORT (e.g. 127.0.0.1:8000)"))?;
    let port = port.parse().map_err(|_| format!("`{port}` in `{s}` is not a port (0-65535)"))?;
    // `[::1]:8000`: the brackets belong to the URL form, not to the address.
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err(format!("`{s}` has no host (e.g. 127.0.0.1:8000, or 0.0.0.0:8000 for every interface)"));
    }
    Ok((host.to_owned(), port))
}

/// uvicorn's level names (`warning`, `critical`) and tracing's.
fn parse_log_level(s: &str) -> Result<tracing::Level, String> {
    match s.to_ascii_lowercase().as_str() {
        "trace" => Ok(tracing::Level::TRACE),
        "debug" => Ok(tracing::Level::DEBUG),
        "info" => Ok(tracing::Level::INFO),
        "warn" | "warning" => Ok(tracing::Level::WARN),
        "error" | "critical" => Ok(tracing::Level::ERROR),
        _ => Err(format!("`{s}` is not a log level: trace, debug, info, warning or error")),
    }
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    let v = parse_secs(s)?;
    if v == 0.0 {
        return Err("must be more than 0 seconds".to_owned());
    }
    Ok(v)
}

impl ServeArgs {
    /// How these flags want the logs: pass it to
    /// [`init_logging_with`](crate::init_logging_with).
    pub fn log_config(&self) -> crate::LogConfig {
        crate::LogConfig {
            level: self.log_level.unwrap_or(tracing::Level::INFO),
            access_log: !self.no_access_log,
            format: self.log_format.unwrap_or_default(),
        }
    }

    /// The configuration these flags describe (defaults for the rest).
    pub fn into_config(self) -> Config {
        self.apply(Config::default())
    }

    /// Applies these flags on top of `base`: a flag given on the command line
    /// (or its environment variable) wins, the app's own value stays for
    /// everything that was not given.
    pub fn apply(self, base: Config) -> Config {
        let mut config = base;
        if let Some(host) = self.host {
            config.host = host;
        }
        if let Some(port) = self.port {
            config.port = port;
        }
        if let Some((host, port)) = self.bind {
            config.host = host;
            config.port = port;
        }
        if let Some(secs) = self.request_timeout {
            config.request_timeout = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
        }
        if let Some(secs) = self.header_read_timeout {
            config.header_read_timeout = Duration::from_secs_f64(secs);
        }
        if let Some(secs) = self.grace_period {
            config.grace_period = Duration::from_secs_f64(secs);
        }
        if let Some(bytes) = self.body_limit {
            config.body_limit = bytes;
        }
        if let Some(n) = self.workers {
            config.workers = n as usize;
        }
        if let Some(secs) = self.timeout {
            config.worker_timeout = Duration::from_secs_f64(secs);
        }
        if let Some(n) = self.max_requests {
            config.max_requests = Some(n);
        }
        if let Some(n) = self.max_requests_jitter {
            config.max_requests_jitter = n;
        }
        if let Some(ms) = self.stall_threshold_ms {
            config.isolation.stall_threshold = Duration::from_millis(ms);
        }
        if let Some(n) = self.runners {
            config.isolation.runners = n as usize;
        }
        if let Some(n) = self.max_threads {
            config.isolation.max_threads = n as usize;
        }
        if self.expose_internal {
            config.expose_internal = true;
        }
        if self.compression {
            config.compression = true;
        }
        if let (Some(certfile), Some(keyfile)) = (self.ssl_certfile, self.ssl_keyfile) {
            config.tls = Some(TlsConfig { certfile, keyfile });
        }
        if self.no_isolation {
            config.isolation.enabled = false;
        }
        // The last of --proxy-headers / --no-proxy-headers given wins (clap
        // clears the other); neither keeps the app's choice.
        if self.proxy_headers {
            config.proxy_headers = true;
        }
        if self.no_proxy_headers {
            config.proxy_headers = false;
        }
        if let Some(ips) = self.forwarded_allow_ips {
            config.forwarded_allow_ips = ips;
        }
        let lanes = &mut config.lanes;
        if let Some(n) = self.blocking_threads {
            lanes.blocking_threads = n as usize;
        }
        if let Some(n) = self.blocking_queue {
            lanes.blocking_queue = n;
        }
        if let Some(n) = self.cpu_threads {
            lanes.cpu_threads = n as usize;
        }
        if let Some(n) = self.cpu_queue {
            lanes.cpu_queue = n;
        }
        if let Some(n) = self.cpu_nice {
            lanes.cpu_nice = n;
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn isolation_flags_reach_the_config() {
        let cli =
            Cli::try_parse_from(["t", "--runners", "1", "--max-threads", "8", "--stall-threshold-ms", "25"])
                .expect("valid flags");
        let config = cli.serve.into_config();
        assert_eq!(config.isolation.runners, 1);
        assert_eq!(config.isolation.max_threads, 8);
        assert_eq!(config.isolation.stall_threshold, Duration::from_millis(25));
        let refused = Cli::try_parse_from(["t", "--runners", "0"]).err().expect("0 runners is refused");
        assert!(refused.to_string().contains("--runners"), "{refused}");
    }

    #[test]
    fn flags_as_uvicorn_and_gunicorn_users_type_them() {
        let cli = Cli::try_parse_from([
            "t",
            "--bind",
            "0.0.0.0:9000",
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-keep-alive",
            "5",
            "--timeout-graceful-shutdown",
            "7",
        ])
        .expect("valid flags");
        let logs = cli.serve.log_config();
        assert_eq!((logs.level, logs.access_log), (tracing::Level::WARN, false));
        let config = cli.serve.into_config();
        assert_eq!((config.host.as_str(), config.port), ("0.0.0.0", 9000));
        assert_eq!(config.header_read_timeout, Duration::from_secs(5));
        assert_eq!(config.grace_period, Duration::from_secs(7));
        let v6 = Cli::try_parse_from(["t", "-b", "[::1]:8001"]).unwrap().serve.into_config();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8001));
        let graceful = Cli::try_parse_from(["t", "--graceful-timeout", "3"]).unwrap().serve.into_config();
        assert_eq!(graceful.grace_period, Duration::from_secs(3));
        assert!(!graceful.expose_internal, "off unless asked for");
        let exposed = Cli::try_parse_from(["t", "--expose-internal"]).unwrap().serve.into_config();
        assert!(exposed.expose_internal);
        // The last of --access-log / --no-access-log wins.
        let on = Cli::try_parse_from(["t", "--no-access-log", "--access-log"]).unwrap();
        assert!(on.serve.log_config().access_log);
        for (args, named) in [
            (&["t", "--bind", "8000"][..], "--bind"),
            (&["t", "--bind", "localhost:http"], "--bind"),
            (&["t", "--bind", "127.0.0.1:9000", "--port", "1"], "--port"),
            (&["t", "--log-level", "loud"], "--log-level"),
        ] {
            let err = Cli::try_parse_from(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(err.to_string().contains(named), "{args:?}: {err}");
        }
    }
}

//! Prometheus metrics of one server: requests, latency, lanes, background.
//!
//! Every name starts with `fastlane_`. Routes are labelled by their matched
//! pattern (`/users/{id}`), never by the raw path, and unmatched requests
//! share one label, so a scan of random URLs cannot blow up the series count.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Whether a [`CompanionMetric`] only goes up or goes both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A count that only goes up (exported with `_total`).
    Counter,
    /// A current value.
    Gauge,
}

/// One number a companion exports in `GET /metrics`.
#[derive(Debug, Clone)]
pub struct CompanionMetric {
    /// The name, without the `fastlane_` prefix (`jobs_succeeded`).
    pub name: &'static str,
    /// The help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// The value now.
    pub value: i64,
}

/// Reads a companion's metrics; called at each scrape of `GET /metrics`.
pub type MetricsSource = Arc<dyn Fn() -> Vec<CompanionMetric> + Send + Sync>;

/// The size of each lane, for its `lane_max_threads` and `lane_queue_limit`
/// gauges (from `LaneConfig`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaneSizes {
    pub(crate) blocking_threads: usize,
    pub(crate) blocking_queue: usize,
    pub(crate) cpu_threads: usize,
    pub(crate) cpu_queue: usize,
}

/// Live numbers of one lane, shared with the metrics registry.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolGauges {
    pub(crate) threads: Gauge,
    pub(crate) busy: Gauge,
    pub(crate) queued: Gauge,
    pub(crate) rejected: Counter,
    pub(crate) completed: Counter,
}

/// Per-lane gauges that the metrics registry reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct LaneGauges {
    pub(crate) blocking: PoolGauges,
    pub(crate) cpu: PoolGauges,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    lane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    lane: &'static str,
    outcome: &'static str,
}

/// How a background task ended, for the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TaskOutcome {
    Ok,
    Failed,
    Panicked,
}

impl TaskOutcome {
    fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Ok => "ok",
            TaskOutcome::Failed => "error",
            TaskOutcome::Panicked => "panic",
        }
    }
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // From 1 ms (a fast route) to 60 s (the longest default timeout).
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
}

fn stall_histogram() -> Histogram {
    // From the 10 ms default threshold to a minute.
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
}

/// Numbers of the watched executor (see `executor/`).
#[derive(Debug, Clone, Default)]
pub(crate) struct IsolationGauges {
    /// Runner threads alive.
    pub(crate) threads: Gauge,
    /// Runner threads stuck in a stall now.
    pub(crate) stuck: Gauge,
    /// The cap on runner threads.
    pub(crate) max_threads: Gauge,
    /// Runner threads started in all.
    pub(crate) started: Counter,
    /// Stuck threads given the lowest priority for burning CPU.
    pub(crate) demoted: Counter,
    /// Requests answered 503 because their route was stalling at the cap.
    pub(crate) rejected: Counter,
    /// The threads the routes that stall may hold at once.
    pub(crate) stall_budget: Gauge,
    /// Of those, held now (set when the metrics are rendered).
    pub(crate) stall_budget_used: Gauge,
    /// Accepted work of stalling routes waiting for a thread of the budget
    /// (set when the metrics are rendered).
    pub(crate) stall_budget_waiting: Gauge,
}

/// The metrics of one server. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    in_flight: Gauge,
    connections: Gauge,
    tasks: Family<TaskLabels, Counter>,
    tasks_pending: Gauge,
    lanes: LaneGauges,
    stalls: HistogramFamily,
    isolation: IsolationGauges,
}

impl Metrics {
    /// `worker`: with `--workers`, this process's worker id and the
    /// supervisor's restart count when it started; every series then carries
    /// a `worker` label, so that scrapes say which worker answered.
    /// `sources`: the companions' own metrics, read at each scrape.
    pub(crate) fn new(lanes: LaneSizes, worker: Option<(u32, u64)>, sources: Vec<MetricsSource>) -> Self {
        let labels = worker
            .map(|(id, _)| (std::borrow::Cow::Borrowed("worker"), std::borrow::Cow::Owned(id.to_string())));
        let mut registry = Registry::with_prefix_and_labels("fastlane", labels.into_iter());
        if let Some((_, restarts)) = worker {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(restarts).unwrap_or(i64::MAX));
            registry.register(
                "supervisor_worker_restarts",
                "Worker restarts the supervisor had made when this worker started (the max over workers is the current count)",
                gauge,
            );
        }
        let mut sources = sources;
        sources.push(Arc::new(|| {
            vec![CompanionMetric {
                name: "log_lines_dropped",
                help: "Log lines dropped because stderr did not take them as fast as they came (the log never makes a request wait)",
                kind: MetricKind::Counter,
                value: i64::try_from(crate::telemetry::log_lines_dropped()).unwrap_or(i64::MAX),
            }]
        }));
        registry.register_collector(Box::new(Sources(sources)));
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            requests.clone(),
        );
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response headers, by method and route",
            latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("http_requests_in_flight", "Requests being handled now", in_flight.clone());
        let connections = Gauge::default();
        registry.register("http_connections_open", "Client connections open now", connections.clone());
        let tasks = Family::<TaskLabels, Counter>::default();
        registry.register(
            "background_tasks",
            "Background tasks finished, by lane and outcome",
            tasks.clone(),
        );
        let tasks_pending = Gauge::default();
        registry.register(
            "background_tasks_pending",
            "Background tasks scheduled or running, not yet finished",
            tasks_pending.clone(),
        );

        let threads = Family::<LaneLabels, Gauge>::default();
        let busy = Family::<LaneLabels, Gauge>::default();
        let queued = Family::<LaneLabels, Gauge>::default();
        let rejected = Family::<LaneLabels, Counter>::default();
        let completed = Family::<LaneLabels, Counter>::default();
        let max_threads = Family::<LaneLabels, Gauge>::default();
        let queue_limit = Family::<LaneLabels, Gauge>::default();
        let gauges_for = |lane: &'static str, max: usize, limit: usize| {
            let labels = LaneLabels { lane };
            max_threads.get_or_create(&labels).set(i64::try_from(max).unwrap_or(i64::MAX));
            queue_limit.get_or_create(&labels).set(i64::try_from(limit).unwrap_or(i64::MAX));
            PoolGauges {
                threads: threads.get_or_create(&labels).clone(),
                busy: busy.get_or_create(&labels).clone(),
                queued: queued.get_or_create(&labels).clone(),
                rejected: rejected.get_or_create(&labels).clone(),
                completed: completed.get_or_create(&labels).clone(),
            }
        };
        let lane_gauges = LaneGauges {
            blocking: gauges_for("blocking", lanes.blocking_threads, lanes.blocking_queue),
            cpu: gauges_for("cpu", lanes.cpu_threads, lanes.cpu_queue),
        };
        registry.register("lane_threads", "Threads alive in the lane", threads);
        registry.register("lane_busy", "Jobs running in the lane now", busy);
        registry.register("lane_queued", "Jobs waiting for a thread of the lane", queued);
        registry.register("lane_rejected", "Jobs refused because the lane was full (answered 503)", rejected);
        registry.register("lane_completed", "Jobs the lane finished", completed);
        registry.register("lane_max_threads", "The lane's thread cap", max_threads);
        registry.register("lane_queue_limit", "The lane's queue limit", queue_limit);

        let stalls: HistogramFamily = Family::new_with_constructor(stall_histogram);
        registry.register(
            "stall_duration_seconds",
            "Stalls (one poll over the threshold) by method and route, with their durations",
            stalls.clone(),
        );
        let isolation = IsolationGauges::default();
        registry.register("isolation_threads", "Runner threads alive", isolation.threads.clone());
        registry.register(
            "isolation_stuck_threads",
            "Runner threads stuck in a stall now",
            isolation.stuck.clone(),
        );
        registry.register(
            "isolation_max_threads",
            "The cap on runner threads",
            isolation.max_threads.clone(),
        );
        registry.register("isolation_threads_started", "Runner threads started", isolation.started.clone());
        registry.register(
            "isolation_demoted",
            "Stuck runner threads given the lowest OS priority for burning CPU",
            isolation.demoted.clone(),
        );
        registry.register(
            "isolation_rejected",
            "Requests answered 503 because their route was stalling with the stall budget spent",
            isolation.rejected.clone(),
        );
        registry.register(
            "isolation_stall_budget",
            "Runner threads the routes that stall may hold at once; the rest are kept for the others",
            isolation.stall_budget.clone(),
        );
        registry.register(
            "isolation_stall_budget_used",
            "Runner threads held by routes that stall (or stuck outside any route known to stall)",
            isolation.stall_budget_used.clone(),
        );
        registry.register(
            "isolation_stall_budget_waiting",
            "Accepted work of stalling routes (background tasks, jobs, requests) waiting for a thread of the budget",
            isolation.stall_budget_waiting.clone(),
        );

        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                latency,
                in_flight,
                connections,
                tasks,
                tasks_pending,
                lanes: lane_gauges,
                stalls,
                isolation,
            }),
        }
    }

    pub(crate) fn lane_gauges(&self) -> LaneGauges {
        self.inner.lanes.clone()
    }

    pub(crate) fn isolation(&self) -> &IsolationGauges {
        &self.inner.isolation
    }

    /// The stall histogram of a route (resolved at its first stall).
    pub(crate) fn stall_histogram(&self, method: &http::Method, route: &str) -> Histogram {
        let labels = RouteLabels { method: method.as_str().to_owned(), route: route.to_owned() };
        self.inner.stalls.get_or_create(&labels).clone()
    }

    /// Sets the in-flight gauge (read off the server's tracker when the
    /// metrics are rendered, rather than counted up and down per request).
    pub(crate) fn set_requests_in_flight(&self, n: usize) {
        self.inner.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_connections_open(&self, n: usize) {
        self.inner.connections.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The latency histogram of a route (resolved once per route).
    pub(crate) fn latency_histogram(&self, method: &http::Method, route: &str) -> Histogram {
        let labels = RouteLabels { method: method.as_str().to_owned(), route: route.to_owned() };
        self.inner.latency.get_or_create(&labels).clone()
    }

    /// The request counter of a route and status (resolved once per pair).
    pub(crate) fn requests_counter(&self, method: &http::Method, route: &str, status: u16) -> Counter {
        let labels = RequestLabels { method: method.as_str().to_owned(), route: route.to_owned(), status };
        self.inner.requests.get_or_create(&labels).clone()
    }

    pub(crate) fn task_scheduled(&self) {
        self.inner.tasks_pending.inc();
    }

    pub(crate) fn task_finished(&self, lane: &'static str, outcome: TaskOutcome) {
        self.inner.tasks_pending.dec();
        self.inner.tasks.get_or_create(&TaskLabels { lane, outcome: outcome.as_str() }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// The companions' metrics, encoded at each scrape.
struct Sources(Vec<MetricsSource>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Sources").field(&self.0.len()).finish()
    }
}

impl prometheus_client::collector::Collector for Sources {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        for source in &self.0 {
            for metric in source() {
                match metric.kind {
                    MetricKind::Counter => {
                        let counter = ConstCounter::new(u64::try_from(metric.value).unwrap_or(0));
                        let at = encoder.encode_descriptor(
                            metric.name,
                            metric.help,
                            None,
                            counter.metric_type(),
                        )?;
                        counter.encode(at)?;
                    }
                    MetricKind::Gauge => {
                        let gauge = ConstGauge::new(metric.value);
                        let at =
                            encoder.encode_descriptor(metric.name, metric.help, None, gauge.metric_type())?;
                        gauge.encode(at)?;
                    }
                }
            }
        }
        Ok(())
    }
}

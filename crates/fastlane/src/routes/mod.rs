//! The routes of the app, each with its stall record and its metric
//! handles: the registry the server, the tracker, the executor and the
//! companions share.
//!
//! Each (method, route pattern) gets one [`RouteInfo`], interned on first use
//! and given a small integer id, so that a runner thread can publish "I am
//! polling route 7" with one atomic store, and the monitor thread can name
//! the route when that poll overruns. The route's metrics (requests by
//! status, latency, stalls) are resolved once, here, so that `metrics` never
//! needs to know what a route is.
//!
//! * `stalls.rs`: the stall record of a route, its row in
//!   `GET /_fastlane/stalls`, and the stall message (what blocked, where, and
//!   what to do about it).

mod stalls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::Metrics;
pub(crate) use stalls::{stall_message, worst_first, Phase, StallStats};
pub use stalls::{StallRow, StallSource};

/// One route of the app: its name, its stall record and its metric handles,
/// resolved once so that a request costs no label allocation or lookup.
#[derive(Debug)]
pub(crate) struct RouteInfo {
    pub(crate) id: u32,
    pub(crate) method: http::Method,
    pub(crate) route: Arc<str>,
    pub(crate) stalls: StallStats,
    latency: Histogram,
    /// The stall histogram, resolved at the route's first stall (a route
    /// that never stalls has no stall series in `/metrics`).
    stall_histogram: OnceLock<Histogram>,
    /// Request counters by status, looked up linearly without a lock: a
    /// route answers with a handful of statuses.
    statuses: [OnceLock<(u16, Counter)>; STATUS_SLOTS],
    /// Taken only to fill a slot, and for statuses beyond the slots.
    more_statuses: Mutex<Vec<(u16, Counter)>>,
    metrics: Metrics,
}

impl RouteInfo {
    /// Records a stall of this route that lasted `took`.
    pub(crate) fn stall_ended(&self, took: Duration) {
        self.stalls.ended(took);
        self.stall_histogram
            .get_or_init(|| self.metrics.stall_histogram(&self.method, &self.route))
            .observe(took.as_secs_f64());
    }

    /// Counts an answered request.
    pub(crate) fn answered(&self, status: u16, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
        for slot in &self.statuses {
            match slot.get() {
                Some((s, counter)) if *s == status => {
                    counter.inc();
                    return;
                }
                Some(_) => {}
                None => break,
            }
        }
        self.status_counter(status).inc();
    }

    /// The slow path of [`answered`](Self::answered): a status not seen yet
    /// (or beyond the slots).
    fn status_counter(&self, status: u16) -> Counter {
        let mut more = self.more_statuses.lock().unwrap_or_else(|p| p.into_inner());
        for slot in &self.statuses {
            match slot.get() {
                Some((s, counter)) if *s == status => return counter.clone(),
                Some(_) => {}
                None => {
                    let counter = self.metrics.requests_counter(&self.method, &self.route, status);
                    // Filled under the lock, so no two threads race for it.
                    let _ = slot.set((status, counter.clone()));
                    return counter;
                }
            }
        }
        if let Some((_, counter)) = more.iter().find(|(s, _)| *s == status) {
            return counter.clone();
        }
        let counter = self.metrics.requests_counter(&self.method, &self.route, status);
        more.push((status, counter.clone()));
        counter
    }
}

/// Statuses a route can count without a lock.
const STATUS_SLOTS: usize = 8;

/// The id used when a runner polls something that is not a request of a
/// known route (a connection reading its next request, a background task of
/// a request without one).
pub(crate) const NO_ROUTE: u32 = 0;

/// Every route seen so far, by id and by name.
#[derive(Debug)]
pub(crate) struct RouteTable {
    by_id: RwLock<Vec<Arc<RouteInfo>>>,
    by_name: RwLock<HashMap<Box<str>, Vec<Arc<RouteInfo>>>>,
    metrics: Metrics,
}

impl RouteTable {
    pub(crate) fn new(metrics: Metrics) -> Self {
        let none = Arc::new(RouteInfo {
            id: NO_ROUTE,
            method: http::Method::GET,
            route: Arc::from("<connection>"),
            stalls: StallStats::default(),
            latency: Histogram::new([]),
            stall_histogram: OnceLock::new(),
            statuses: Default::default(),
            more_statuses: Mutex::default(),
            metrics: metrics.clone(),
        });
        Self { by_id: RwLock::new(vec![none]), by_name: RwLock::default(), metrics }
    }

    /// The route's info, interning it on first sight.
    pub(crate) fn get(&self, method: &http::Method, route: &str) -> Arc<RouteInfo> {
        {
            let by_name = self.by_name.read().unwrap_or_else(|p| p.into_inner());
            if let Some(found) = by_name.get(route).and_then(|v| v.iter().find(|r| r.method == method)) {
                return found.clone();
            }
        }
        let mut by_name = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        let entries = by_name.entry(Box::from(route)).or_default();
        if let Some(found) = entries.iter().find(|r| r.method == method) {
            return found.clone();
        }
        let mut by_id = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        let info = Arc::new(RouteInfo {
            id: u32::try_from(by_id.len()).unwrap_or(u32::MAX),
            method: method.clone(),
            route: Arc::from(route),
            stalls: StallStats::default(),
            latency: self.metrics.latency_histogram(method, route),
            stall_histogram: OnceLock::new(),
            statuses: Default::default(),
            more_statuses: Mutex::default(),
            metrics: self.metrics.clone(),
        });
        by_id.push(info.clone());
        entries.push(info.clone());
        info
    }

    pub(crate) fn by_id(&self, id: u32) -> Option<Arc<RouteInfo>> {
        self.by_id.read().unwrap_or_else(|p| p.into_inner()).get(id as usize).cloned()
    }

    /// Routes that have stalled, worst first.
    pub(crate) fn stall_rows(&self) -> Vec<StallRow> {
        let by_id = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<StallRow> =
            by_id.iter().filter_map(|r| r.stalls.row(&r.method, &r.route)).collect();
        worst_first(&mut rows);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_counted_also_beyond_the_lock_free_slots() {
        let metrics = Metrics::new((&crate::LaneConfig::default()).into(), None, Vec::new());
        let routes = RouteTable::new(metrics.clone());
        let route = routes.get(&http::Method::GET, "/x");
        let statuses: Vec<u16> = (200..200 + STATUS_SLOTS as u16 + 3).collect();
        for (i, status) in statuses.iter().enumerate() {
            for _ in 0..=i {
                route.answered(*status, Duration::from_millis(1));
            }
        }
        let text = metrics.render();
        for (i, status) in statuses.iter().enumerate() {
            let line = format!(
                "fastlane_http_requests_total{{method=\"GET\",route=\"/x\",status=\"{status}\"}} {}",
                i + 1
            );
            assert!(text.contains(&line), "no `{line}` in\n{text}");
        }
    }
}

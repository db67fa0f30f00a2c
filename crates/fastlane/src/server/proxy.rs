//! Proxy headers: who the client is when a trusted proxy forwards a request.
//!
//! Behind nginx, a load balancer or a CDN, the socket's peer is the proxy;
//! the client's address and scheme come in `X-Forwarded-For` /
//! `X-Forwarded-Proto` (or RFC 7239's `Forwarded`). Those headers are believed
//! only from a peer in `--forwarded-allow-ips` (uvicorn's and gunicorn's
//! semantics; default `127.0.0.1`), since any client can send them: from
//! anyone else they are ignored, and the client is the socket's peer.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, HeaderName};

use crate::ApiError;

/// The peers whose proxy headers are believed: addresses and networks
/// (`127.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`), or `*` for any peer.
///
/// Parsed from a comma-separated list, as uvicorn's and gunicorn's
/// `--forwarded-allow-ips`. An IPv4 peer seen on a dual-stack socket
/// (`::ffff:127.0.0.1`) matches its IPv4 form.
///
/// # Examples
///
/// ```
/// let trusted: fastlane::ForwardedAllowIps = "127.0.0.1, 10.0.0.0/8".parse()?;
/// assert!(trusted.trusts("10.1.2.3".parse()?));
/// assert!(!trusted.trusts("192.168.1.1".parse()?));
/// assert!("*".parse::<fastlane::ForwardedAllowIps>()?.trusts("192.168.1.1".parse()?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedAllowIps {
    any: bool,
    nets: Vec<(IpAddr, u8)>,
}

impl ForwardedAllowIps {
    /// Trusts no peer: proxy headers are never believed.
    pub fn none() -> Self {
        Self { any: false, nets: Vec::new() }
    }

    /// Whether a request from `peer` may say who its client was.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        if self.any {
            return true;
        }
        let peer = peer.to_canonical();
        self.nets.iter().any(|&(net, bits)| in_net(peer, net, bits))
    }
}

impl Default for ForwardedAllowIps {
    /// `127.0.0.1`: a proxy on the same machine, as uvicorn and gunicorn.
    fn default() -> Self {
        Self { any: false, nets: vec![(IpAddr::from([127, 0, 0, 1]), 32)] }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

impl FromStr for ForwardedAllowIps {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut allowed = Self::none();
        for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            if item == "*" {
                allowed.any = true;
                continue;
            }
            let (addr, bits) = match item.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (item, None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| {
                format!("`{item}` is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1, or * for any)")
            })?;
            let addr = addr.to_canonical();
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|&b| b <= max)
                    .ok_or_else(|| format!("`{item}`: the prefix length must be 0-{max}"))?,
            };
            allowed.nets.push((addr, bits));
        }
        Ok(allowed)
    }
}

impl fmt::Display for ForwardedAllowIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self.any.then(|| "*".to_owned()).into_iter().collect();
        for &(net, bits) in &self.nets {
            let max = if net.is_ipv4() { 32 } else { 128 };
            items.push(if bits == max { net.to_string() } else { format!("{net}/{bits}") });
        }
        f.write_str(&items.join(","))
    }
}

/// The client of a request as the server takes it: the socket's peer, or,
/// when that peer is a trusted proxy (see [`ForwardedAllowIps`]) and says so
/// in `X-Forwarded-For` / `X-Forwarded-Proto` or `Forwarded`, the client it
/// forwarded for. Every request served by [`Server`](crate::Server) has one
/// (an extractor; a middleware of the app's, under fastlane's own layer,
/// finds it with [`ClientInfo::current`]); the access log and an ASGI app's
/// `client` and `scheme` show it. axum's `ConnectInfo<SocketAddr>` stays the
/// socket's peer.
///
/// # Examples
///
/// ```
/// async fn whoami(client: fastlane::ClientInfo) -> String {
///     format!("{} over {}", client.addr.ip(), client.scheme())
/// }
/// let app: axum::Router = axum::Router::new().route("/whoami", axum::routing::get(whoami));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's address. A forwarded address has port `0` (proxies do
    /// not pass the client's port on), as uvicorn's `client`.
    pub addr: SocketAddr,
    /// Whether the client used HTTPS (with the proxy, when forwarded).
    pub https: bool,
    /// The socket's peer: the proxy, when forwarded; else the client.
    pub peer: SocketAddr,
}

impl ClientInfo {
    /// `"https"` or `"http"`.
    pub fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// Whether the address came from a proxy's headers.
    pub fn is_forwarded(&self) -> bool {
        self.addr != self.peer
    }

    /// The client of a request from `peer` (over TLS when `https`) with
    /// these headers: the proxy headers are read when `trusted` says the
    /// peer may send them.
    pub(crate) fn resolve(
        peer: SocketAddr,
        https: bool,
        headers: &HeaderMap,
        trusted: Option<&ForwardedAllowIps>,
    ) -> Self {
        let direct = Self { addr: peer, https, peer };
        let Some(trusted) = trusted.filter(|t| t.trusts(peer.ip())) else { return direct };
        // Most requests, even from a trusted proxy, carry none of these: one
        // look along the (few) names costs less than a hashed lookup of each.
        let forwarded =
            |name: &HeaderName| *name == X_FORWARDED_FOR || *name == X_FORWARDED_PROTO || *name == FORWARDED;
        if !headers.keys().any(forwarded) {
            return direct;
        }
        let mut client = direct;
        if let Some(proto) = last_value(headers, X_FORWARDED_PROTO) {
            client.https = is_https(proto);
        }
        // The X-Forwarded-* pair is what proxies send most; RFC 7239's
        // `Forwarded` is read when there is no X-Forwarded-For.
        let xff: Vec<&str> = list(headers, X_FORWARDED_FOR).collect();
        if !xff.is_empty() {
            if let Some(ip) = walk(&xff, trusted) {
                client.addr = SocketAddr::new(ip, 0);
            }
            return client;
        }
        let elements: Vec<Vec<(&str, &str)>> = list(headers, FORWARDED).map(forwarded_pairs).collect();
        if elements.is_empty() {
            return client;
        }
        if let Some(proto) = elements.last().and_then(|pairs| pair(pairs, "proto")) {
            client.https = is_https(proto);
        }
        let fors: Vec<&str> = elements.iter().filter_map(|pairs| pair(pairs, "for")).collect();
        if let Some(ip) = walk(&fors, trusted) {
            client.addr = SocketAddr::new(ip, 0);
        }
        client
    }
}

/// The client in a list of hops, nearest last: the first address from the
/// right that is not a trusted proxy (each trusted one vouches for the hop
/// before it), or the leftmost if all are trusted. An entry that is not an
/// address (`unknown`, an obfuscated name) ends the walk: nothing beyond it
/// can be vouched for, and the last trusted address stands.
fn walk(hops: &[&str], trusted: &ForwardedAllowIps) -> Option<IpAddr> {
    let mut client = None;
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop)?;
        client = Some(ip);
        if !trusted.trusts(ip) {
            break;
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`, quoted or not.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    let bracketed = hop.strip_prefix('[')?.split(']').next()?;
    bracketed.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn is_https(proto: &str) -> bool {
    matches!(proto.trim().trim_matches('"').to_ascii_lowercase().as_str(), "https" | "wss")
}

// The headers a trusted proxy speaks through, as `HeaderName`s: looked up
// by a `&str` they would be parsed again for every request.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Every comma-separated item of every line of a header, in order.
fn list(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

fn last_value(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    list(headers, name).last()
}

/// `for=192.0.2.60;proto=http;by=203.0.113.43` as name/value pairs.
fn forwarded_pairs(element: &str) -> Vec<(&str, &str)> {
    element
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect()
}

fn pair<'a>(pairs: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|&(_, v)| v)
}

/// The mark of a request that came over TLS (from the connection's service
/// to the route layer, which works out the [`ClientInfo`]); plain-text
/// requests carry none, so they pay no extension for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OverTls;

impl<S: Send + Sync> FromRequestParts<S> for ClientInfo {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        ClientInfo::current().ok_or_else(|| {
            ApiError::internal(
                "fastlane::ClientInfo is set by fastlane::Server; this request did not come through it",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(name, value.parse().unwrap());
        }
        map
    }

    fn resolve(peer: &str, pairs: &[(&'static str, &str)], trusted: &str) -> ClientInfo {
        let trusted: ForwardedAllowIps = trusted.parse().unwrap();
        ClientInfo::resolve(peer.parse().unwrap(), false, &headers(pairs), Some(&trusted))
    }

    #[test]
    fn parses_addresses_networks_and_any() {
        let t: ForwardedAllowIps = "127.0.0.1, 10.0.0.0/8,::1, fd00::/8".parse().unwrap();
        assert!(t.trusts("10.255.0.1".parse().unwrap()));
        assert!(t.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(t.trusts("fd12::1".parse().unwrap()));
        assert!(!t.trusts("11.0.0.1".parse().unwrap()));
        assert!(!t.trusts("127.0.0.2".parse().unwrap()));
        assert_eq!(t.to_string(), "127.0.0.1,10.0.0.0/8,::1,fd00::/8");
        assert!("0.0.0.0/0".parse::<ForwardedAllowIps>().unwrap().trusts("8.8.8.8".parse().unwrap()));
        assert!(!"".parse::<ForwardedAllowIps>().unwrap().trusts("127.0.0.1".parse().unwrap()));
        let err = "localhost".parse::<ForwardedAllowIps>().unwrap_err();
        assert!(err.contains("`localhost` is not an IP address"), "{err}");
        let err = "10.0.0.0/33".parse::<ForwardedAllowIps>().unwrap_err();
        assert!(err.contains("0-32"), "{err}");
    }

    #[test]
    fn untrusted_peers_headers_are_ignored() {
        let c = resolve(
            "203.0.113.9:5000",
            &[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "https")],
            "127.0.0.1",
        );
        assert_eq!((c.addr, c.https, c.is_forwarded()), ("203.0.113.9:5000".parse().unwrap(), false, false));
        let none = ClientInfo::resolve(
            "127.0.0.1:1".parse().unwrap(),
            false,
            &headers(&[("x-forwarded-for", "1.2.3.4")]),
            None,
        );
        assert!(!none.is_forwarded());
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        // A client spoofs 6.6.6.6; the proxy at 10.0.0.2 appends the real
        // one, and the trusted 127.0.0.1 forwards to us.
        let c = resolve(
            "127.0.0.1:4000",
            &[("x-forwarded-for", "6.6.6.6, 5.6.7.8, 10.0.0.2")],
            "127.0.0.1,10.0.0.0/8",
        );
        assert_eq!(c.addr, "5.6.7.8:0".parse().unwrap());
        assert_eq!(c.peer, "127.0.0.1:4000".parse().unwrap());
        // All trusted: the leftmost.
        let c = resolve(
            "127.0.0.1:4000",
            &[("x-forwarded-for", "10.0.0.3"), ("x-forwarded-for", "10.0.0.2")],
            "127.0.0.1,10.0.0.0/8",
        );
        assert_eq!(c.addr.ip(), "10.0.0.3".parse::<IpAddr>().unwrap());
        // `*` trusts every hop, so the leftmost is the client.
        let c = resolve("9.9.9.9:1", &[("x-forwarded-for", "1.1.1.1, 2.2.2.2")], "*");
        assert_eq!(c.addr.ip(), "1.1.1.1".parse::<IpAddr>().unwrap());
        // Ports and brackets are tolerated.
        let c = resolve("127.0.0.1:1", &[("x-forwarded-for", "[2001:db8::1]:443")], "127.0.0.1");
        assert_eq!(c.addr.ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
        // Not an address: the walk stops at the last trusted one.
        let c = resolve("127.0.0.1:1", &[("x-forwarded-for", "unknown")], "127.0.0.1");
        assert!(!c.is_forwarded());
    }

    #[test]
    fn scheme_from_x_forwarded_proto_or_forwarded() {
        let c = resolve("127.0.0.1:1", &[("x-forwarded-proto", "HTTPS")], "127.0.0.1");
        assert_eq!((c.scheme(), c.is_forwarded()), ("https", false));
        let c = resolve(
            "127.0.0.1:1",
            &[(
                "forwarded",
                r#"for=192.0.2.60;proto=https;by=203.0.113.43, for="[2001:db8:cafe::17]:4711";proto=https"#,
            )],
            "127.0.0.1",
        );
        assert_eq!((c.addr.ip(), c.https), ("2001:db8:cafe::17".parse::<IpAddr>().unwrap(), true));
        // X-Forwarded-For wins over Forwarded.
        let c = resolve(
            "127.0.0.1:1",
            &[("forwarded", "for=1.1.1.1"), ("x-forwarded-for", "2.2.2.2")],
            "127.0.0.1",
        );
        assert_eq!(c.addr.ip(), "2.2.2.2".parse::<IpAddr>().unwrap());
    }
}

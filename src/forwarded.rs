//! Whose request it is: the address a request comes from, for `per: client_ip` budgets and the
//! access line. The socket peer, unless that peer is one of `trusted_proxies` (an ingress, a
//! load balancer): then `X-Forwarded-For`'s right-most hop that is not a trusted proxy.
//!
//! Right-most, not left-most: each proxy appends the address it received the request from, so
//! only the entries added by trusted proxies can be believed; everything left of the first
//! untrusted entry (reading from the right) was written by the client and may be forged. A
//! client that prepends addresses to its own `X-Forwarded-For` still lands in the bucket of its
//! real address.
//!
//! Pure: no Pingora, no sockets.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The client's address: `peer` when `trusted` is empty or does not contain it; otherwise the
/// right-most `X-Forwarded-For` entry not in `trusted`, walking right to left over every
/// `X-Forwarded-For` header line in order (`xff`, each a comma-separated list).
///
/// - An entry that is not an address (`unknown`, garbage) stops the walk: the client is then
///   the last trusted hop, the one that wrote it. A client cannot use this to pick its bucket:
///   its own entries are left of the address the trusted proxy appended.
/// - When every entry is trusted, the left-most one is the client (an internal caller).
/// - No header: the peer.
/// - IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) count as IPv4; an entry may carry a port
///   (`10.0.0.1:1234`, `[2001:db8::1]:443`), which is dropped.
///
/// ```
/// use shiftgate::forwarded::client_ip;
///
/// let trusted = ["10.0.0.0/8".parse().unwrap()];
/// let peer = "10.0.0.2".parse().unwrap();
/// // The ingress appended the client's address.
/// assert_eq!(client_ip(peer, ["203.0.113.7"], &trusted), "203.0.113.7".parse::<std::net::IpAddr>().unwrap());
/// // A forged left-most entry changes nothing.
/// assert_eq!(client_ip(peer, ["198.51.100.1, 203.0.113.7"], &trusted), "203.0.113.7".parse::<std::net::IpAddr>().unwrap());
/// // Without trusted proxies, the header is not read at all.
/// assert_eq!(client_ip(peer, ["203.0.113.7"], &[]), peer);
/// ```
pub fn client_ip<'a>(
    peer: IpAddr,
    xff: impl IntoIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let entries: Vec<&str> = xff
        .into_iter()
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else {
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`[v6]:port`, `v4:port`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const INGRESS: &str = "10.1.2.3";

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() {
        assert_eq!(client_ip(ip(INGRESS), ["203.0.113.7"], &[]), ip(INGRESS));
    }

    #[test]
    fn an_untrusted_peer_is_the_client_even_with_a_header() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("192.0.2.9"), ["203.0.113.7"], &trusted),
            ip("192.0.2.9")
        );
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8", "172.16.0.0/12"]);
        // client -> CDN edge (untrusted, appended by the ingress) ... the edge is the client
        // as far as this proxy can tell.
        assert_eq!(
            client_ip(ip(INGRESS), ["203.0.113.7, 172.16.5.5"], &trusted),
            ip("203.0.113.7")
        );
        // Two trusted proxies in a row.
        assert_eq!(
            client_ip(
                ip(INGRESS),
                ["198.51.100.4, 172.16.5.5, 10.9.9.9"],
                &trusted
            ),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn forged_entries_left_of_the_real_address_change_nothing() {
        let trusted = nets(&["10.0.0.0/8"]);
        for forged in [
            "1.1.1.1, 203.0.113.7",
            "10.0.0.1, 203.0.113.7",
            "garbage, 203.0.113.7",
        ] {
            assert_eq!(
                client_ip(ip(INGRESS), [forged], &trusted),
                ip("203.0.113.7"),
                "{forged}"
            );
        }
    }

    #[test]
    fn several_header_lines_are_one_list_in_order() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(
                ip(INGRESS),
                ["198.51.100.4", "203.0.113.7, 10.0.0.5"],
                &trusted
            ),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn a_garbage_entry_stops_at_the_trusted_hop_that_wrote_it() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip(INGRESS), ["unknown"], &trusted), ip(INGRESS));
        assert_eq!(
            client_ip(ip(INGRESS), ["203.0.113.7, unknown, 10.0.0.5"], &trusted),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn all_trusted_means_the_left_most_entry_and_no_header_means_the_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip(INGRESS), ["10.0.0.7, 10.0.0.5"], &trusted),
            ip("10.0.0.7")
        );
        assert_eq!(
            client_ip(ip(INGRESS), std::iter::empty::<&str>(), &trusted),
            ip(INGRESS)
        );
        assert_eq!(client_ip(ip(INGRESS), [" , "], &trusted), ip(INGRESS));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses_are_understood() {
        let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(
            client_ip(ip("::ffff:10.1.2.3"), ["203.0.113.7:5555"], &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("fd00::1"), ["[2001:db8::1]:443"], &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(ip("fd00::1"), ["[2001:db8::2]"], &trusted),
            ip("2001:db8::2")
        );
        assert_eq!(
            client_ip(ip("fd00::1"), ["::ffff:203.0.113.9"], &trusted),
            ip("203.0.113.9")
        );
    }
}

//! Who a client is: the address limits and passive health count it under, and how that
//! address is found behind trusted front proxies.

use std::net::{IpAddr, Ipv6Addr};

use hyper::header::{HeaderMap, HeaderValue};

use crate::config::Cidr;

/// A client as limits and passive health see it: its IPv4 address, or its IPv6 /64 (one
/// host is handed a whole /64, so counting single v6 addresses would count nothing). Two
/// words, not a u128: every session holds one, and a u128 would align it to 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u64, u64);

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::v4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::v4(u32::from(v4)),
                // The /64; the second word tells v6 keys from v4 ones.
                None => ClientKey((u128::from(v6) >> 64) as u64, 1),
            },
        }
    }
}

impl ClientKey {
    fn v4(ip: u32) -> ClientKey {
        ClientKey(u64::from(ip), 0)
    }
}

/// Whether `ip` is one of the trusted front proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|cidr| cidr.contains(ip))
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy; then the last
/// address in X-Forwarded-For that is not itself a trusted proxy (walking from the right, as
/// each proxy appends the address it saw). An entry that is not an address ends the walk.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_ip(entry.trim()) else {
            break;
        };
        client = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// An X-Forwarded-For entry: an address, maybe with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(addr) = entry.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|v6| v6.parse::<Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

/// The X-Forwarded-For a request carries, for the access log (only ever from a trusted proxy).
pub fn forwarded_for(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers.get("x-forwarded-for")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> Vec<Cidr> {
        vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_trusted_peers_can_name_the_client() {
        let spoof = headers(&["6.6.6.6"]);
        let untrusted: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_address(untrusted, &spoof, &trusted()), untrusted);
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            client_address(proxy, &headers(&["6.6.6.6, 198.51.100.7"]), &trusted()),
            "198.51.100.7".parse::<IpAddr>().unwrap(),
            "the rightmost untrusted entry: what the trusted proxy saw"
        );
        assert_eq!(
            client_address(proxy, &headers(&["198.51.100.7", "10.9.9.9"]), &trusted()),
            "198.51.100.7".parse::<IpAddr>().unwrap(),
            "a chain of trusted proxies is walked"
        );
        assert_eq!(
            client_address(proxy, &headers(&["garbage, 10.9.9.9"]), &trusted()),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &trusted()), proxy);
        assert_eq!(
            client_address(proxy, &headers(&["[2001:db8::1]:443"]), &trusted()),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a = ClientKey::from("2001:db8:1:2::1".parse::<IpAddr>().unwrap());
        let b = ClientKey::from("2001:db8:1:2:ffff::9".parse::<IpAddr>().unwrap());
        let c = ClientKey::from("2001:db8:1:3::1".parse::<IpAddr>().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let v4 = ClientKey::from("192.0.2.1".parse::<IpAddr>().unwrap());
        let mapped = ClientKey::from("::ffff:192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(v4, mapped);
        assert_ne!(v4, ClientKey::from("::c000:201".parse::<IpAddr>().unwrap()));
    }
}

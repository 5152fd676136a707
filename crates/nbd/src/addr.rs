//! Where an NBD server listens: plain addresses and NBD URIs.

use crate::{Error, Result};
use std::fmt;
use std::path::PathBuf;

/// Default NBD TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;

/// A server address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// A Unix socket path (what QEMU's NBD server uses for local backups).
    Unix(PathBuf),
    /// `host:port` (IPv6 hosts in brackets: `[::1]:10809`).
    Tcp(String),
}

impl Addr {
    /// Parses `unix:/path`, `/abs/path` (Unix socket) or `host:port` (TCP).
    pub fn parse(s: &str) -> Result<Addr> {
        let bad = |why: &str| Err(Error::InvalidArgument(format!("NBD address {s:?}: {why}")));
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return bad("empty socket path");
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Addr::Unix(PathBuf::from(s)));
        }
        if s.contains("://") {
            return bad("looks like a URI; use parse_uri");
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return bad("expected unix:/path, /path or host:port");
        };
        if let Err(e) = check_host(host) {
            return bad(&e);
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(Addr::Tcp(s.to_string())),
            _ => bad(&format!("port {port:?} is not a number from 1 to 65535")),
        }
    }
}

/// A host is a name or IPv4 address without colons, or a bracketed IPv6 address.
fn check_host(host: &str) -> std::result::Result<(), String> {
    if host.is_empty() {
        return Err("empty host".into());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(format!("host {host:?} has an unclosed bracket"));
        };
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{inner:?} is not an IPv6 address"));
        }
        return Ok(());
    }
    if host.contains([':', '[', ']', '/', '?', '#', '@']) || host.contains(char::is_whitespace) {
        return Err(format!(
            "host {host:?} is not valid (IPv6 addresses need brackets)"
        ));
    }
    Ok(())
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(h) => f.write_str(h),
        }
    }
}

/// Parses an NBD URI into the address and the export name:
/// `nbd+unix:///EXPORT?socket=PATH` and `nbd://host[:port][/EXPORT]`. Export names
/// and the socket path are percent-decoded. TLS schemes (`nbds`) are refused
/// because this client has no TLS.
pub fn parse_uri(s: &str) -> Result<(Addr, String)> {
    let bad = |why: &str| Err(Error::InvalidArgument(format!("NBD URI {s:?}: {why}")));
    let Some((scheme, rest)) = s.split_once("://") else {
        return bad("expected nbd://... or nbd+unix://...");
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
        return bad("fragments are not allowed");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = match percent_decode(path) {
        Ok(e) => e,
        Err(e) => return bad(&e),
    };
    match scheme {
        "nbd+unix" => {
            if !authority.is_empty() {
                return bad("nbd+unix URIs have no host (nbd+unix:///export?socket=PATH)");
            }
            let mut socket = None;
            for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let (k, v) = param.split_once('=').unwrap_or((param, ""));
                if k == "socket" {
                    match percent_decode(v) {
                        Ok(p) if !p.is_empty() => socket = Some(p),
                        Ok(_) => return bad("empty socket path"),
                        Err(e) => return bad(&e),
                    }
                }
            }
            match socket {
                Some(p) => Ok((Addr::Unix(PathBuf::from(p)), export)),
                None => bad("missing ?socket=PATH"),
            }
        }
        "nbd" => {
            if authority.contains('@') {
                return bad("user names are not supported");
            }
            let (host, port) = split_host_port(authority);
            if let Err(e) = check_host(host) {
                return bad(&e);
            }
            let port = match port {
                None => DEFAULT_PORT,
                Some(p) => match p.parse::<u16>() {
                    Ok(p) if p != 0 => p,
                    _ => return bad(&format!("port {p:?} is not a number from 1 to 65535")),
                },
            };
            Ok((Addr::Tcp(format!("{host}:{port}")), export))
        }
        "nbds" | "nbds+unix" => Err(Error::Unsupported(format!(
            "NBD URI {s:?}: TLS (nbds) is not supported by this client"
        ))),
        other => bad(&format!("unsupported scheme {other:?}")),
    }
}

/// Splits `host[:port]`, keeping IPv6 brackets with the host.
fn split_host_port(a: &str) -> (&str, Option<&str>) {
    if a.starts_with('[') {
        match a.find(']') {
            Some(i) => {
                let (h, rest) = a.split_at(i + 1);
                match rest.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if rest.is_empty() => (h, None),
                    // Leave garbage after the bracket to check_host via the host.
                    None => (a, None),
                }
            }
            None => (a, None),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_addresses() {
        assert_eq!(
            Addr::parse("unix:/run/s").unwrap(),
            Addr::Unix("/run/s".into())
        );
        assert_eq!(Addr::parse("/run/s").unwrap(), Addr::Unix("/run/s".into()));
        assert_eq!(
            Addr::parse("localhost:10809").unwrap(),
            Addr::Tcp("localhost:10809".into())
        );
        assert_eq!(Addr::parse("[::1]:7").unwrap(), Addr::Tcp("[::1]:7".into()));
        for bad in [
            "", "unix:", "host", "host:", ":80", "h:0", "h:99999", "::1:80", "nbd://h", "[::1:80",
            "a b:1",
        ] {
            assert!(
                matches!(Addr::parse(bad), Err(Error::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(Addr::parse("unix:/x").unwrap().to_string(), "unix:/x");
        assert_eq!(Addr::parse("h:1").unwrap().to_string(), "h:1");
    }

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd+unix:///drive0?socket=/tmp/s").unwrap(),
            (Addr::Unix("/tmp/s".into()), "drive0".into())
        );
        assert_eq!(
            parse_uri("nbd+unix:///?socket=/tmp/a%20b").unwrap(),
            (Addr::Unix("/tmp/a b".into()), String::new())
        );
        assert_eq!(
            parse_uri("nbd+unix://?socket=/s").unwrap(),
            (Addr::Unix("/s".into()), String::new())
        );
        assert_eq!(
            parse_uri("nbd://example.com:1234/my%2Fdisk").unwrap(),
            (Addr::Tcp("example.com:1234".into()), "my/disk".into())
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1").unwrap(),
            (Addr::Tcp("127.0.0.1:10809".into()), String::new())
        );
        assert_eq!(
            parse_uri("nbd://[::1]/e").unwrap(),
            (Addr::Tcp("[::1]:10809".into()), "e".into())
        );
        assert_eq!(
            parse_uri("nbd://[::1]:99/e").unwrap(),
            (Addr::Tcp("[::1]:99".into()), "e".into())
        );
        assert!(matches!(
            parse_uri("nbds://h/e"),
            Err(Error::Unsupported(_))
        ));
        for bad in [
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/s",
            "nbd+unix:///e?socket=",
            "nbd://h:0/e",
            "nbd://:1/e",
            "nbd://u@h/e",
            "nbd://h/%zz",
            "nbd://h/%ff",
            "nbd://h/e#frag",
            "nbd://[::1]x/e",
            "http://h/e",
            "h:1",
        ] {
            assert!(
                matches!(parse_uri(bad), Err(Error::InvalidArgument(_))),
                "{bad:?} accepted: {:?}",
                parse_uri(bad)
            );
        }
    }
}

//! The TCP congestion control of client connections (`tcp.client_congestion_control`).
//!
//! On a loopback connection the algorithm has nothing to control: no loss, no queue, a round
//! trip of microseconds. What it can still do is cost time. BBR, the default on many hosts,
//! paces every connection: when the receiver's window opens, the sender waits for a
//! high-resolution timer instead of sending at once, and a client reading a large body falls
//! asleep between bursts. Measured on a 2-core host with BBR as its default, a 1 GiB download
//! through the proxy ran at 0.69 to 0.86 of direct with BBR on the proxy-to-client leg and at
//! 0.83 to 1.19 with Reno (BENCHMARKS.md). So `auto`, the default, moves loopback client
//! connections from a pacing algorithm (BBR) to Reno, the one algorithm Linux lets every
//! process choose. Connections from other hosts keep the host's choice: across a real network
//! the administrator chose BBR for a reason. The upstream leg keeps the host's choice too,
//! unless its peer is on loopback (an upstream or an egress proxy on this host), where `auto`
//! leaves pacing for the same reason: a 256 MiB upload to a loopback upstream ran at 0.83 to
//! 0.87 of direct under BBR and at 0.94 to 0.98 with Reno.
//!
//! The setting is made once on the listening socket, which accepted connections inherit,
//! when the listener is on a loopback address; a listener on a wildcard or another address sets
//! it on each accepted connection whose peer is on loopback (one system call).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};

/// `tcp.client_congestion_control`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Congestion {
    /// Loopback client connections leave a pacing algorithm (BBR) for Reno; others keep the
    /// host's default.
    #[default]
    Auto,
    /// The host's default everywhere (`net.ipv4.tcp_congestion_control`).
    System,
    /// This algorithm for every client connection; the proxy does not start if the host does
    /// not offer it to unprivileged processes (`net.ipv4.tcp_allowed_congestion_control`).
    Named(String),
}

impl Congestion {
    /// Parses the configuration value; the error says what is accepted.
    pub fn parse(s: &str) -> Result<Congestion, String> {
        match s {
            "auto" => Ok(Congestion::Auto),
            "system" => Ok(Congestion::System),
            // TCP_CA_NAME_MAX is 16 bytes with the terminating NUL.
            name if !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                Ok(Congestion::Named(name.to_string()))
            }
            other => Err(format!(
                "`tcp.client_congestion_control` must be \"auto\", \"system\" or the name of a \
                 congestion control algorithm such as \"reno\" or \"cubic\", not \"{other}\""
            )),
        }
    }
}

/// The algorithm `auto` moves loopback connections to: no pacing, and always allowed.
const UNPACED: &str = "reno";

/// Algorithms that pace their sending with a timer of their own (TCP's internal pacing).
fn paces(algorithm: &str) -> bool {
    algorithm.starts_with("bbr")
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Sets up a proxy listener right after it is bound. An algorithm named in the configuration
/// that the host refuses is an error (the proxy does not start); `auto` never fails.
pub fn setup_listener(tcp: &TcpListener, addr: SocketAddr, mode: &Congestion) -> io::Result<()> {
    match mode {
        Congestion::System => Ok(()),
        Congestion::Named(name) => imp::set(tcp, name).map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::NotFound => "the kernel has no such algorithm (it lists those \
                    it has in net.ipv4.tcp_available_congestion_control)"
                    .to_string(),
                io::ErrorKind::PermissionDenied => "this process may not choose it (the \
                    host lists those it may in net.ipv4.tcp_allowed_congestion_control)"
                    .to_string(),
                _ => e.to_string(),
            };
            io::Error::new(
                e.kind(),
                format!("cannot use TCP congestion control \"{name}\" on {addr}: {why}"),
            )
        }),
        Congestion::Auto => {
            if is_loopback(addr.ip()) && imp::get(tcp).is_some_and(|a| paces(&a)) {
                if let Err(e) = imp::set(tcp, UNPACED) {
                    tracing::debug!(%addr, error = %e, "could not leave the pacing congestion control");
                }
            }
            Ok(())
        }
    }
}

/// What [`on_accept`] does on this listener's connections: `Some` when loopback peers of a
/// listener that is not on loopback itself must leave a pacing algorithm one by one.
pub fn per_connection(tcp: &TcpListener, mode: &Congestion) -> Option<&'static str> {
    if *mode != Congestion::Auto {
        return None;
    }
    let addr = tcp.local_addr().ok()?;
    (!is_loopback(addr.ip()) && imp::get(tcp).is_some_and(|a| paces(&a))).then_some(UNPACED)
}

/// For the start-up log: the algorithm of the listener's connections, and the one loopback
/// clients get when that differs.
pub fn describe(tcp: &TcpListener, mode: &Congestion) -> String {
    let own = imp::get(tcp).unwrap_or_else(|| "the host's default".into());
    match per_connection(tcp, mode) {
        Some(loopback) => format!("{own}, {loopback} for loopback clients"),
        None => own,
    }
}

/// With `auto`, an upstream connection whose peer is on loopback (an upstream or an egress
/// proxy on this host) leaves a pacing algorithm too (best effort). Sending a large upload to a
/// loopback peer under BBR ran at 0.83 to 0.87 of direct, with Reno at 0.94 to 0.98
/// (BENCHMARKS.md). Upstreams on other hosts keep the host's choice.
pub fn on_connect(stream: &TcpStream, mode: &Congestion) {
    if *mode == Congestion::Auto
        && stream.peer_addr().is_ok_and(|a| is_loopback(a.ip()))
        && imp::get(stream).is_some_and(|a| paces(&a))
    {
        if let Err(e) = imp::set(stream, UNPACED) {
            tracing::debug!(error = %e, "could not leave the pacing congestion control");
        }
    }
}

/// Applies [`per_connection`]'s answer to an accepted connection (best effort).
pub fn on_accept(stream: &TcpStream, remote: SocketAddr, algorithm: Option<&'static str>) {
    if let Some(algorithm) = algorithm {
        if is_loopback(remote.ip()) {
            let _ = imp::set(stream, algorithm);
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    pub use rustix::fd::AsFd as AsSocket;
    use std::io;

    pub fn get(socket: &impl AsSocket) -> Option<String> {
        rustix::net::sockopt::tcp_congestion(socket).ok()
    }

    pub fn set(socket: &impl AsSocket, name: &str) -> io::Result<()> {
        rustix::net::sockopt::set_tcp_congestion(socket, name).map_err(io::Error::from)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::io;

    pub trait AsSocket {}
    impl<T> AsSocket for T {}

    pub fn get(_socket: &impl AsSocket) -> Option<String> {
        None
    }

    pub fn set(_socket: &impl AsSocket, _name: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "choosing the congestion control is supported on Linux only",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_values() {
        assert_eq!(Congestion::parse("auto"), Ok(Congestion::Auto));
        assert_eq!(Congestion::parse("system"), Ok(Congestion::System));
        assert_eq!(
            Congestion::parse("cubic"),
            Ok(Congestion::Named("cubic".into()))
        );
        for bad in ["", "a very long algorithm name", "re no", "reno\0"] {
            let e = Congestion::parse(bad).unwrap_err();
            assert!(e.contains("tcp.client_congestion_control"), "{e}");
        }
    }

    #[test]
    fn only_bbr_paces_and_loopback_includes_mapped_addresses() {
        assert!(paces("bbr") && paces("bbr2"));
        assert!(!paces("cubic") && !paces("reno"));
        assert!(is_loopback("127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
    }

    /// A listener on `addr` that starts with BBR, as on a host whose default is BBR; None when
    /// this host does not let the process choose BBR.
    async fn bbr_listener(addr: &str) -> Option<TcpListener> {
        let tcp = TcpListener::bind(addr).await.unwrap();
        imp::set(&tcp, "bbr").ok()?;
        Some(tcp)
    }

    /// Connects to `tcp` from loopback and returns the algorithm of the accepted side, after
    /// [`on_accept`] with what [`per_connection`] says for `mode`.
    async fn accepted_algorithm(tcp: &TcpListener, mode: &Congestion) -> String {
        let port = tcp.local_addr().unwrap().port();
        let per = per_connection(tcp, mode);
        let _client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (stream, remote) = tcp.accept().await.unwrap();
        on_accept(&stream, remote, per);
        imp::get(&stream).unwrap()
    }

    #[tokio::test]
    async fn auto_moves_loopback_connections_off_bbr() {
        let Some(tcp) = bbr_listener("127.0.0.1:0").await else {
            eprintln!("this host does not offer BBR; nothing to move away from");
            return;
        };
        let addr = tcp.local_addr().unwrap();
        setup_listener(&tcp, addr, &Congestion::Auto).unwrap();
        assert_eq!(imp::get(&tcp).as_deref(), Some("reno"));
        // Inherited: no per-connection call on a loopback listener.
        assert_eq!(per_connection(&tcp, &Congestion::Auto), None);
        assert_eq!(accepted_algorithm(&tcp, &Congestion::Auto).await, "reno");
        assert_eq!(describe(&tcp, &Congestion::Auto), "reno");

        // A wildcard listener keeps BBR (peers from other hosts keep it); loopback peers leave it.
        let tcp = bbr_listener("0.0.0.0:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        setup_listener(&tcp, addr, &Congestion::Auto).unwrap();
        assert_eq!(imp::get(&tcp).as_deref(), Some("bbr"));
        assert_eq!(per_connection(&tcp, &Congestion::Auto), Some("reno"));
        assert_eq!(accepted_algorithm(&tcp, &Congestion::Auto).await, "reno");
        assert_eq!(
            describe(&tcp, &Congestion::Auto),
            "bbr, reno for loopback clients"
        );
    }

    #[tokio::test]
    async fn auto_moves_upstream_connections_to_loopback_off_bbr() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        for (mode, want) in [
            (Congestion::Auto, "reno"),
            (Congestion::System, "bbr"),
            (Congestion::Named("cubic".into()), "bbr"),
        ] {
            let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let _accepted = tcp.accept().await.unwrap();
            if imp::set(&stream, "bbr").is_err() {
                eprintln!("this host does not offer BBR; nothing to move away from");
                return;
            }
            on_connect(&stream, &mode);
            assert_eq!(imp::get(&stream).as_deref(), Some(want), "{mode:?}");
        }
    }

    #[tokio::test]
    async fn system_leaves_the_host_default_and_a_name_is_applied_or_refused() {
        if let Some(tcp) = bbr_listener("127.0.0.1:0").await {
            let addr = tcp.local_addr().unwrap();
            setup_listener(&tcp, addr, &Congestion::System).unwrap();
            assert_eq!(per_connection(&tcp, &Congestion::System), None);
            assert_eq!(accepted_algorithm(&tcp, &Congestion::System).await, "bbr");
        }

        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let reno = Congestion::Named("reno".into());
        setup_listener(&tcp, addr, &reno).unwrap();
        assert_eq!(accepted_algorithm(&tcp, &reno).await, "reno");

        let e = setup_listener(&tcp, addr, &Congestion::Named("nosuchalgo".into())).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"nosuchalgo\"") && msg.contains(&addr.to_string()),
            "{msg}"
        );
        assert!(msg.contains("has no such algorithm"), "{msg}");
    }
}

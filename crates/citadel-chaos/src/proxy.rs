//! Fault proxies: one in front of each node's cluster port. A node's outbound cluster
//! connections come from its own loopback address (`127.0.1.{slot+1}`), so a proxy knows which
//! node is calling and can cut the pair: that is how partitions are made without touching the
//! nodes.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Pairs of node slots that cannot talk (stored with the smaller slot first).
pub type Cuts = BTreeSet<(usize, usize)>;

/// The network between the nodes: which pairs are cut.
pub struct FaultNet {
    cuts: watch::Sender<Cuts>,
    proxies: Vec<JoinHandle<()>>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// The slot of the node whose cluster connections come from `ip`, if it is one of ours.
fn slot_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) => match v4.octets() {
            [127, 0, 1, n] if n > 0 => Some(n as usize - 1),
            _ => None,
        },
        IpAddr::V6(_) => None,
    }
}

impl FaultNet {
    pub fn new() -> FaultNet {
        FaultNet { cuts: watch::channel(Cuts::new()).0, proxies: Vec::new() }
    }

    /// Starts a proxy for node `slot`: accepts on `listen`, forwards to `target`.
    pub async fn add_proxy(&mut self, slot: usize, listen: &str, target: &str) -> Result<()> {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("proxy cannot listen on {listen}"))?;
        let target: SocketAddr = target.parse()?;
        let cuts = self.cuts.subscribe();
        self.proxies.push(tokio::spawn(accept_loop(listener, slot, target, cuts)));
        Ok(())
    }

    /// Cuts every link between a node of `side_a` and a node of `side_b`.
    pub fn cut(&self, side_a: &[usize], side_b: &[usize]) {
        self.cuts.send_modify(|cuts| {
            for &a in side_a {
                for &b in side_b {
                    if a != b {
                        cuts.insert(pair(a, b));
                    }
                }
            }
        });
    }

    pub fn heal(&self) {
        self.cuts.send_replace(Cuts::new());
    }

    pub fn describe(&self) -> String {
        let cuts = self.cuts.borrow();
        let links: Vec<String> = cuts.iter().map(|(a, b)| format!("{}-x-{}", a + 1, b + 1)).collect();
        links.join(",")
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        for proxy in &self.proxies {
            proxy.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, slot: usize, target: SocketAddr, cuts: watch::Receiver<Cuts>) {
    loop {
        let Ok((inbound, peer)) = listener.accept().await else { continue };
        let from = slot_of(peer.ip());
        tokio::spawn(relay(inbound, from, slot, target, cuts.clone()));
    }
}

/// Relays one connection until it ends or its link is cut (then both sides see it drop).
async fn relay(
    mut inbound: TcpStream,
    from: Option<usize>,
    to: usize,
    target: SocketAddr,
    mut cuts: watch::Receiver<Cuts>,
) {
    let is_cut = |cuts: &Cuts| from.is_some_and(|f| cuts.contains(&pair(f, to)));
    if is_cut(&cuts.borrow_and_update()) {
        return;
    }
    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
    let _ = outbound.set_nodelay(true);
    let _ = inbound.set_nodelay(true);
    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            changed = cuts.changed() => {
                if changed.is_err() || is_cut(&cuts.borrow_and_update()) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_loopback_addresses_name_a_slot() {
        assert_eq!(slot_of("127.0.1.1".parse().unwrap()), Some(0));
        assert_eq!(slot_of("127.0.1.5".parse().unwrap()), Some(4));
        assert_eq!(slot_of("127.0.0.1".parse().unwrap()), None);
        assert_eq!(slot_of("127.0.1.0".parse().unwrap()), None);
    }

    #[tokio::test]
    async fn a_cut_link_drops_live_connections_and_refuses_new_ones() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut net = FaultNet::new();
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap().to_string();
        drop(probe);
        net.add_proxy(1, &listen, &echo_addr.to_string()).await.unwrap();
        let connect = || async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.1.1:0".parse().unwrap()).unwrap();
            socket.connect(listen.parse().unwrap()).await.unwrap()
        };
        let mut conn = connect().await;
        conn.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        net.cut(&[0], &[1]);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a cut link must drop the connection");
        let mut again = connect().await;
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), again.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a new connection over a cut link must be closed");

        net.heal();
        let mut healed = connect().await;
        healed.write_all(b"pong").await.unwrap();
        healed.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}

//! Sockets inside a pod's network namespace. A socket's namespace is fixed
//! when it is created, so each enrolled pod has one thread that lives in its
//! namespace and only creates sockets; the sockets are then used from the
//! async runtime like any other. The thread keeps a few sockets ready, so a
//! new connection does not wait for it to be scheduled.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

/// Unbound sockets kept ready per pod (one file descriptor each): taking
/// one instead of waking the namespace's thread took 50–140 µs off a new
/// meshed connection's p50 (docs/benchmarks.md).
const SPARE_SOCKETS: usize = 4;

enum Request {
    Socket(oneshot::Sender<io::Result<TcpSocket>>),
    /// Make sockets until [`SPARE_SOCKETS`] are ready.
    Refill,
}

/// Ready sockets, shared by the handles and the namespace's thread.
#[derive(Debug, Default)]
struct Spare {
    sockets: Mutex<Vec<TcpSocket>>,
    /// A refill is asked for and not yet done: one request in the queue
    /// at a time.
    refilling: AtomicBool,
}

impl Spare {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TcpSocket>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes sockets (in the calling thread's namespace) until enough are
    /// ready; stops at the first failure, which a caller asking for a
    /// socket then sees itself.
    fn fill(&self) {
        loop {
            if self.lock().len() >= SPARE_SOCKETS {
                break;
            }
            match TcpSocket::new_v4() {
                Ok(socket) => self.lock().push(socket),
                Err(_) => break,
            }
        }
        self.refilling.store(false, Ordering::Release);
    }
}

/// Creates sockets in one pod's network namespace.
#[derive(Debug, Clone)]
pub struct PodSockets {
    netns: PathBuf,
    requests: mpsc::Sender<Request>,
    spare: Arc<Spare>,
}

impl PodSockets {
    /// Starts the namespace's socket thread; it ends when every handle is dropped.
    pub fn new(netns: &Path) -> io::Result<Self> {
        let ns = std::fs::File::open(netns)?;
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let spare = Arc::new(Spare::default());
        let filled = spare.clone();
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || {
                use std::os::fd::AsFd;
                let entered = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                filled.fill();
                for request in rx {
                    match request {
                        Request::Socket(reply) => {
                            let _ = reply.send(TcpSocket::new_v4());
                        }
                        Request::Refill => filled.fill(),
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns socket thread died"))??;
        Ok(Self {
            netns: netns.to_path_buf(),
            requests: tx,
            spare,
        })
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// A new, unbound TCP socket in the pod's namespace: a ready one if
    /// there is one, else made now.
    pub async fn socket(&self) -> io::Result<TcpSocket> {
        let ready = self.spare.lock().pop();
        if !self.spare.refilling.swap(true, Ordering::AcqRel) {
            let _ = self.requests.send(Request::Refill);
        }
        if let Some(socket) = ready {
            return Ok(socket);
        }
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Socket(tx))
            .map_err(|_| io::Error::other("netns socket thread ended"))?;
        rx.await
            .map_err(|_| io::Error::other("netns socket thread ended"))?
    }

    /// Connects from inside the pod's namespace.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self.socket().await?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Connects from inside the pod's namespace with `src` as the source
    /// address, which need not be one of the pod's (`IP_TRANSPARENT`); the
    /// connection carries [`crate::transparent::MARK`] so the pod's return
    /// path brings the replies back.
    pub async fn connect_from(
        &self,
        src: IpAddr,
        to: SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        use nix::sys::socket::{setsockopt, sockopt};
        let socket = self.socket().await?;
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(io::Error::from)?;
        setsockopt(&socket, sockopt::Mark, &crate::transparent::MARK).map_err(io::Error::from)?;
        // The port is chosen by `connect`, as for the client's own
        // connections (unique per destination), not by `bind` among the
        // ports no socket of this address holds towards any destination.
        setsockopt(&socket, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        socket.bind(SocketAddr::new(src, 0))?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Listens on `ip:port` inside the pod's namespace.
    pub async fn listen(&self, ip: Ipv4Addr, port: u16) -> io::Result<TcpListener> {
        let socket = self.socket().await?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip.into(), port))?;
        socket.listen(1024)
    }
}

impl hbone::Dialer for PodSockets {
    fn dial(
        &self,
        dst: SocketAddr,
    ) -> futures_util::future::BoxFuture<'static, io::Result<tokio::net::TcpStream>> {
        let sockets = self.clone();
        Box::pin(async move { sockets.connect(dst).await })
    }
}

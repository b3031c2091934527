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
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

/// Unbound sockets kept ready per pod (one file descriptor each), so that
/// a new connection takes one instead of waking the namespace's thread and
/// waiting for it (measurements in docs/benchmarks.md).
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
    /// A refill is asked for and has not started: at most one such
    /// request waits in the queue.
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
        // Cleared first: a socket taken while this fill runs asks for the
        // next one.
        self.refilling.store(false, Ordering::Release);
        loop {
            if self.lock().len() >= SPARE_SOCKETS {
                break;
            }
            match TcpSocket::new_v4() {
                Ok(socket) => self.lock().push(socket),
                Err(_) => break,
            }
        }
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
    /// Starts the namespace's socket thread, which has the first sockets
    /// ready when this returns; it ends when every handle is dropped.
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
                if entered.is_ok() {
                    filled.fill();
                }
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
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
    /// there is one, else made now (before the ready ones are refilled).
    pub async fn socket(&self) -> io::Result<TcpSocket> {
        let ready = self.spare.lock().pop();
        if let Some(socket) = ready {
            self.refill();
            return Ok(socket);
        }
        let (tx, rx) = oneshot::channel();
        let asked = self.requests.send(Request::Socket(tx));
        self.refill();
        asked.map_err(|_| io::Error::other("netns socket thread ended"))?;
        rx.await
            .map_err(|_| io::Error::other("netns socket thread ended"))?
    }

    /// Asks the thread to top up the ready sockets, unless that is already
    /// asked for.
    fn refill(&self) {
        if !self.spare.refilling.swap(true, Ordering::AcqRel) {
            let _ = self.requests.send(Request::Refill);
        }
    }

    /// Connects from inside the pod's namespace.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self.socket().await?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// [`Self::connect`], given up (`TimedOut`) after `limit`: a peer that
    /// drops SYNs would otherwise hold the client for the kernel's retries,
    /// about two minutes.
    pub async fn connect_within(
        &self,
        to: SocketAddr,
        limit: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        tokio::time::timeout(limit, self.connect(to))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {limit:?}"),
                ))
            })
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

#[cfg(test)]
mod tests {
    //! Need root (a network namespace of the test's own); under CI a
    //! missing root is a failure.

    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use std::time::Instant;

    use capture::netns::netns_cookie;
    use integration_tests::require_root;

    use super::*;

    /// A network namespace that lives as long as the value: a thread that
    /// entered a new one and waits to be told to end (the namespace goes
    /// with its last reference, so nothing is left behind).
    struct TestNetns {
        path: PathBuf,
        cookie: u64,
        end: Option<mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestNetns {
        fn new() -> Self {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (end_tx, end_rx) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let probe = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
                let cookie = netns_cookie(&probe).unwrap();
                // `<pid>/task/<tid>`: this thread's namespace, named so
                // that other threads can open it.
                let task = std::fs::read_link("/proc/thread-self").unwrap();
                let path = format!("/proc/{}/ns/net", task.display());
                ready_tx.send((path, cookie)).unwrap();
                let _ = end_rx.recv();
            });
            let (path, cookie) = ready_rx.recv().unwrap();
            Self {
                path: path.into(),
                cookie,
                end: Some(end_tx),
                thread: Some(thread),
            }
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            drop(self.end.take());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    async fn refilled(sockets: &PodSockets) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while sockets.spare.lock().len() < SPARE_SOCKETS {
            assert!(Instant::now() < deadline, "ready sockets not refilled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn ready_and_on_demand_sockets_are_in_the_pods_namespace() {
        if !require_root("ready_and_on_demand_sockets_are_in_the_pods_namespace") {
            return;
        }
        let ns = TestNetns::new();
        let host = netns_cookie(&std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        assert_ne!(host, ns.cookie);
        let sockets = PodSockets::new(&ns.path).unwrap();
        assert_eq!(sockets.spare.lock().len(), SPARE_SOCKETS, "ready on start");

        // The ready ones, then again after they were refilled.
        for _ in 0..2 {
            for _ in 0..SPARE_SOCKETS {
                let socket = sockets.socket().await.unwrap();
                assert_eq!(netns_cookie(&socket).unwrap(), ns.cookie);
            }
            refilled(&sockets).await;
        }

        // More at once than are ready: the rest are made on demand.
        let mut held = Vec::new();
        for _ in 0..5 * SPARE_SOCKETS {
            held.push(sockets.socket().await.unwrap());
        }
        for socket in &held {
            assert_eq!(netns_cookie(socket).unwrap(), ns.cookie);
        }
        refilled(&sockets).await;

        let listener = sockets.listen(Ipv4Addr::UNSPECIFIED, 0).await.unwrap();
        assert_eq!(netns_cookie(&listener).unwrap(), ns.cookie);
    }

    #[tokio::test]
    async fn a_connect_without_an_answer_is_given_up_at_its_limit() {
        if !require_root("a_connect_without_an_answer_is_given_up_at_its_limit") {
            return;
        }
        // A listener whose accept queue is full (a backlog of 0 holds one
        // connection) drops further SYNs.
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = tokio::net::TcpStream::connect(addr).await.unwrap();
        let sockets = PodSockets::new(Path::new("/proc/self/ns/net")).unwrap();
        let started = Instant::now();
        let err = sockets
            .connect_within(addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        // With room in the queue the same connect succeeds.
        let (accepted, _) = listener.accept().await.unwrap();
        drop((accepted, queued));
        let mut accepting = tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        sockets
            .connect_within(addr, Duration::from_secs(5))
            .await
            .unwrap();
        accepting.abort();
        let _ = (&mut accepting).await;
    }

    #[test]
    fn a_file_that_is_no_network_namespace_is_refused() {
        // Opens, but is no namespace: the thread's setns fails.
        let err = PodSockets::new(Path::new("/dev/null")).unwrap_err();
        let refused = [nix::errno::Errno::EINVAL, nix::errno::Errno::EPERM].map(|e| e as i32);
        assert!(
            err.raw_os_error().is_some_and(|e| refused.contains(&e)),
            "{err}"
        );
        let err = PodSockets::new(Path::new("/nonexistent/netns")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}

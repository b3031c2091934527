//! Sockets made for a pod live in the pod's network namespace, whether
//! taken from the ready ones or made on demand once those run out. Needs
//! root (a network namespace of the test's own); under CI a missing root
//! is a failure.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::sync::mpsc;

use capture::netns::netns_cookie;
use integration_tests::require_root;
use ztunnel::netns::PodSockets;

/// A network namespace that lives as long as the value: a thread that
/// entered a new one and waits to be told to end (the namespace goes with
/// its last reference, so nothing is left behind).
struct TestNetns {
    path: std::path::PathBuf,
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
            // `<pid>/task/<tid>`: this thread's namespace, named so that
            // other threads can open it.
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

#[tokio::test]
async fn every_socket_is_made_in_the_pods_namespace() {
    if !require_root("every_socket_is_made_in_the_pods_namespace") {
        return;
    }
    let ns = TestNetns::new();
    let host = netns_cookie(&std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    assert_ne!(host, ns.cookie);
    let sockets = PodSockets::new(&ns.path).unwrap();

    // More at once than are kept ready: the rest are made on demand.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(sockets.socket().await.unwrap());
    }
    for socket in &held {
        assert_eq!(netns_cookie(socket).unwrap(), ns.cookie);
    }
    drop(held);

    // Taken one at a time, the ready ones are refilled in the namespace.
    for _ in 0..20 {
        let socket = sockets.socket().await.unwrap();
        assert_eq!(netns_cookie(&socket).unwrap(), ns.cookie);
        tokio::task::yield_now().await;
    }

    // A listener made from them is in the namespace too.
    let listener = sockets
        .listen(std::net::Ipv4Addr::UNSPECIFIED, 0)
        .await
        .unwrap();
    assert_eq!(netns_cookie(&listener).unwrap(), ns.cookie);
}

#[test]
fn a_namespace_that_cannot_be_entered_is_an_error() {
    let err = PodSockets::new(std::path::Path::new("/nonexistent/netns")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

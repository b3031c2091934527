//! Inbound traffic of one captured pod. Tunnels accepted on the pod's 15008
//! (TLS with the pod's own certificate, protocol checks in `hbone`) and
//! plaintext connections captured to its 15006 are judged against the
//! pod's peer authentication and authorization policies, then connected to
//! the application inside the pod's namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use capture::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use hbone::copy::copy_bidirectional_until;
use hbone::{Handler, InboundRequest, Refusal, Rejection, Tunnel};
use identity::Identity;
use model::{Snapshot, Workload};
use tokio::net::TcpStream;

use crate::agent::{Shared, copy_plain_until};
use crate::conns::{Authorized, Tracked};
use crate::netns::PodSockets;
use crate::telemetry::{ConnRecord, Direction};

/// Serves one pod's inbound connections; cheap to clone.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The pod as the mesh config knew it at enrollment, or as enrollment
    /// described it when the config does not know it yet.
    pod: Arc<Workload>,
    identity: Identity,
    sockets: PodSockets,
    shared: Arc<Shared>,
    /// The pod's return path is installed: connect to the application
    /// from the client's address (`crate::transparent`).
    transparent: bool,
}

impl Inbound {
    pub fn new(
        pod: Workload,
        identity: Identity,
        sockets: PodSockets,
        shared: Arc<Shared>,
        transparent: bool,
    ) -> Self {
        Self {
            pod: Arc::new(pod),
            identity,
            sockets,
            shared,
            transparent,
        }
    }

    /// Connects to the application's `port` on the pod's address, from
    /// inside its namespace: over loopback, so the capture does not see it
    /// again. From the client's address when the return path allows.
    async fn connect_app(&self, client: IpAddr, port: u16) -> std::io::Result<TcpStream> {
        let app = SocketAddr::new(self.ip().into(), port);
        if self.transparent && client != app.ip() {
            self.sockets.connect_from(client, app).await
        } else {
            self.sockets.connect(app).await
        }
    }

    /// The pod as `snapshot` knows it (its labels and owner may have come
    /// or changed since enrollment), or as enrolled.
    fn current<'a>(&'a self, snapshot: &'a Snapshot) -> &'a Workload {
        snapshot.workload(&self.pod.uid).unwrap_or(&self.pod)
    }

    fn ip(&self) -> Ipv4Addr {
        self.pod.ips[0]
    }

    /// Whether a connection to `port` can be served at all, before any
    /// policy: not to ztunnel's own ports, and not before the controller's
    /// first config. The error is the metrics code and the reason.
    fn servable(&self, snapshot: &Snapshot, port: u16) -> Result<(), (&'static str, String)> {
        if let Some(reason) = self.shared.unconfigured(snapshot) {
            return Err((NO_CONFIG, reason.to_string()));
        }
        not_own_port(port).map_err(|reason| ("ztunnel_port", reason))
    }

    /// Registers an authorized connection for re-judging, and judges it
    /// again at once if the config changed since `judged_on`: a policy
    /// change that landed in between was re-evaluated without it.
    fn track(&self, record: &ConnRecord, authorized: Authorized, judged_on: &Snapshot) -> Tracked {
        let tracked = self.shared.conns.track(record.clone(), Some(authorized));
        let now = self.shared.snapshot();
        if now.version() != judged_on.version() {
            tracked.judge_again(&now);
        }
        tracked
    }

    /// The record of an inbound connection to this pod, without the source
    /// identity (set by the caller when there is one).
    fn record(&self, snapshot: &Snapshot, peer: SocketAddr, dst: SocketAddr) -> ConnRecord {
        let mut record = ConnRecord::new(Direction::Inbound, peer, dst);
        if let Some(w) = ipv4(peer.ip()).and_then(|ip| snapshot.workload_by_ip(ip)) {
            record.set_src(w);
        }
        record.dst_endpoint = dst.to_string();
        record.set_dst(self.current(snapshot));
        record.dst_identity = self.identity.to_string();
        record
    }

    /// Judges a new connection from `peer` (with `identity` when it proved
    /// one) to this pod's `port`; on refusal counts and logs it. Returns
    /// what it was authorized on, for re-judging.
    fn admit(
        &self,
        snapshot: &Snapshot,
        record: &mut ConnRecord,
        identity: Option<Identity>,
        peer: SocketAddr,
        port: u16,
    ) -> Result<Authorized, String> {
        // Policies match IPv4 blocks; a client they cannot place is refused
        // rather than judged as some other address.
        let Some(src_ip) = ipv4(peer.ip()) else {
            let reason = format!("client address {} is not IPv4", peer.ip());
            self.shared.metrics.failed(record, "unsupported_address");
            record.log(0, 0, &reason);
            return Err(reason);
        };
        let authorized = Authorized {
            src_identity: identity,
            src_ip,
            dst: (*self.pod).clone(),
            dst_port: port,
        };
        let judgement = authorized.judge(snapshot);
        record.policy = judgement.policy;
        record.note = judgement.note;
        if judgement.allowed {
            return Ok(authorized);
        }
        self.shared.metrics.failed(record, judgement.code);
        record.log(0, 0, &judgement.reason);
        Err(judgement.reason)
    }

    /// A plaintext connection captured to the pod's 15006 (from a client
    /// outside the mesh): refused under STRICT, else authorized on its
    /// source address alone.
    pub async fn plaintext(self, mut client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        // The assigned socket keeps the address the client dialled.
        let Ok(orig) = client.local_addr() else {
            return;
        };
        let snapshot = self.shared.snapshot();
        let mut record = self.record(&snapshot, peer, orig);
        if let Err((code, reason)) = self.servable(&snapshot, orig.port()) {
            self.shared.metrics.failed(&record, code);
            record.log(0, 0, &reason);
            return;
        }
        let Ok(authorized) = self.admit(&snapshot, &mut record, None, peer, orig.port()) else {
            // Dropping the socket closes it: the client sees the connection
            // end without any byte of the application.
            return;
        };
        // The pod's address, not loopback: an application listening on
        // 127.0.0.1 only is not reachable from outside the pod directly,
        // and must not become reachable through the mesh.
        let mut upstream = match self.connect_app(peer.ip(), orig.port()).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.shared.metrics.failed(&record, "connect_failed");
                record.log(
                    0,
                    0,
                    &format!("connect {}:{}: {error}", self.ip(), orig.port()),
                );
                return;
            }
        };
        let tracked = self.track(&record, authorized, &snapshot);
        self.shared.metrics.opened(&record);
        let (to_dst, to_src, result) =
            copy_plain_until(&mut client, &mut upstream, tracked.closed()).await;
        let reason = match result {
            Ok(()) => String::new(),
            Err(error) => tracked.close_reason(&mut record, error),
        };
        self.shared.metrics.closed(&record, to_dst, to_src);
        record.log(to_dst, to_src, &reason);
    }
}

impl Handler for Inbound {
    /// A client that failed the TLS handshake (no certificate, another
    /// trust domain) or sent a malformed CONNECT: logged and counted here,
    /// where the operator of the destination looks.
    fn refused(&self, refusal: Refusal) {
        let snapshot = self.shared.snapshot();
        let listener = SocketAddr::new(self.ip().into(), HBONE_PORT);
        let mut record = self.record(&snapshot, refusal.peer_addr, listener);
        record.protocol = "HBONE";
        if let Some(identity) = &refusal.peer_identity {
            record.src_identity = identity.to_string();
        }
        self.shared.metrics.failed(&record, refusal.code);
        record.log(0, 0, &refusal.reason);
    }

    async fn serve(&self, req: InboundRequest, tunnel: Tunnel) {
        let snapshot = self.shared.snapshot();
        let mut record = self.record(&snapshot, req.peer_addr, req.authority);
        record.protocol = "HBONE";
        record.src_identity = req.peer_identity.to_string();
        // Only a service the config knows, by the name the client's side
        // reports it under: a label from the client's header alone would let
        // any peer make up metric series.
        if let Some(service) = req
            .metadata
            .forwarded
            .as_ref()
            .and_then(|f| f.host.as_deref())
            .and_then(|host| snapshot.service_by_hostname(host))
        {
            record.set_service(service);
        }
        // The server already refused an authority for another IP; this
        // guards a listener that was bound more widely.
        if req.authority.ip() != IpAddr::V4(self.ip()) {
            let reason = format!("no workload {} behind this listener", req.authority.ip());
            self.shared.metrics.failed(&record, "no_such_workload");
            record.log(0, 0, &reason);
            tunnel.reject(&Rejection::unavailable(reason));
            return;
        }
        if let Err((code, reason)) = self.servable(&snapshot, req.authority.port()) {
            self.shared.metrics.failed(&record, code);
            record.log(0, 0, &reason);
            tunnel.reject(&if code == NO_CONFIG {
                Rejection::unavailable(reason)
            } else {
                Rejection::bad_request(reason)
            });
            return;
        }
        let authorized = match self.admit(
            &snapshot,
            &mut record,
            Some(req.peer_identity.clone()),
            req.peer_addr,
            req.authority.port(),
        ) {
            Ok(authorized) => authorized,
            Err(reason) => {
                tunnel.reject(&Rejection::denied(reason));
                return;
            }
        };
        let upstream = match self
            .connect_app(req.peer_addr.ip(), req.authority.port())
            .await
        {
            Ok(upstream) => upstream,
            Err(error) => {
                let reason = format!("connect {}: {error}", req.authority);
                self.shared.metrics.failed(&record, "connect_failed");
                record.log(0, 0, &reason);
                tunnel.reject(&Rejection::unavailable(reason));
                return;
            }
        };
        let stream = match tunnel.accept() {
            Ok(stream) => stream,
            Err(error) => {
                // Authorized and connected, but the client's stream is
                // gone: still one access line and a counted failure.
                self.shared.metrics.failed(&record, "client_gone");
                record.log(
                    0,
                    0,
                    &format!("client went away before the tunnel opened: {error}"),
                );
                return;
            }
        };
        let tracked = self.track(&record, authorized, &snapshot);
        self.shared.metrics.opened(&record);
        let (reader, writer) = upstream.into_split();
        // In the copy, `sent` is what the application sent back (to the
        // source) and `received` what the tunnel brought (to the app).
        let (t, reason) =
            match copy_bidirectional_until(reader, writer, stream, tracked.closed()).await {
                Ok(t) => (t, String::new()),
                Err(e) => (e.transferred, tracked.close_reason(&mut record, e.source)),
            };
        self.shared.metrics.closed(&record, t.received, t.sent);
        record.log(t.received, t.sent, &reason);
    }
}

const NO_CONFIG: &str = "no_config";

/// ztunnel's own ports in the pod are never an application's: the capture
/// lets connections to them through, and forwarding one to the pod's
/// address would land on ztunnel's listener again, over and over.
fn not_own_port(port: u16) -> Result<(), String> {
    if [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&port) {
        Err(format!(
            "port {port} is ztunnel's own: not forwarded to the application"
        ))
    } else {
        Ok(())
    }
}

fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip.to_canonical() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use integration_tests::require_root;
    use tokio::sync::watch;

    use super::*;
    use crate::agent::AgentStats;
    use crate::telemetry::Metrics;

    /// A pod enrolled before the config listed it is described by
    /// enrollment (its pod name, no owner); once the config lists it,
    /// its connections are recorded as the config describes it.
    #[tokio::test]
    async fn connections_are_recorded_as_the_current_config_knows_the_pod() {
        if !require_root("connections_are_recorded_as_the_current_config_knows_the_pod") {
            return;
        }
        let enrolled: Workload =
            serde_yaml::from_str("{uid: u1, name: echo-0, namespace: demo, ips: [10.0.0.1]}")
                .unwrap();
        let (_current, config) = watch::channel(Arc::new(Snapshot::empty()));
        let shared = Arc::new(Shared {
            config,
            conns: Default::default(),
            metrics: Arc::new(Metrics::new()),
            stats: Arc::new(AgentStats::default()),
            awaiting_config: false,
        });
        let identity = Identity::parse("spiffe://cluster.local/ns/demo/sa/echo").unwrap();
        let sockets = PodSockets::new(std::path::Path::new("/proc/self/ns/net")).unwrap();
        let inbound = Inbound::new(enrolled, identity, sockets, shared, false);
        let (peer, dst) = (
            "10.0.0.9:40000".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
        );

        let record = inbound.record(&Snapshot::empty(), peer, dst);
        assert_eq!(record.dst_owner, ("demo".into(), "echo-0".into()));

        let listed = serde_yaml::from_str(
            "workloads: [{uid: u1, name: echo-0, namespace: demo, workloadName: echo, ips: [10.0.0.1]}]",
        )
        .unwrap();
        let snapshot = Snapshot::new(listed, 1).unwrap();
        let record = inbound.record(&snapshot, peer, dst);
        assert_eq!(record.dst_owner, ("demo".into(), "echo".into()));
        assert_eq!(record.dst_workload, "demo/echo-0");
    }
}

//! The lab's mesh config, generated from its plan: every pod is a workload
//! (HBONE when meshed), every Service a service with its endpoints. Until
//! the controller serves the lab, each ztunnel reads this file.

use model::{InboundProtocol, Locality, MeshConfig, Service, ServicePort, Workload};

use crate::plan::Plan;

pub fn mesh_config(plan: &Plan) -> MeshConfig {
    let workloads = plan
        .pods
        .iter()
        .map(|p| Workload {
            uid: p.uid.clone(),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
            ips: vec![p.ip],
            node: plan.nodes[p.node].name.clone(),
            protocol: if p.meshed {
                InboundProtocol::Hbone
            } else {
                InboundProtocol::Tcp
            },
            // Pods are named `<deployment>-<n>`.
            workload_name: p.name.rsplit_once('-').map(|(d, _)| d.to_string()),
            labels: p.labels.clone(),
            // One zone per node, so zone preference is observable.
            locality: Locality {
                region: "lab".into(),
                zone: plan.nodes[p.node].name.clone(),
            },
            waypoint: None,
        })
        .collect();
    let services = plan
        .services
        .iter()
        .map(|s| Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: Some(s.fqdn()),
            vips: vec![s.cluster_ip],
            ports: s
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: Some(p.name.clone()),
                    port: p.port,
                    target_port: Some(p.target_port),
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|&i| plan.pods[i].uid.clone())
                .collect(),
            traffic_distribution: None,
            waypoint: None,
        })
        .collect();
    MeshConfig {
        trust_domain: "cluster.local".into(),
        workloads,
        services,
        ..MeshConfig::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::spec::LabSpec;

    #[test]
    fn the_default_lab_is_a_valid_mesh_config() {
        let plan = Plan::new(&LabSpec::default());
        let config = mesh_config(&plan);
        let snapshot = model::Snapshot::new(config, 1).unwrap();
        let echo = plan.pods.iter().find(|p| p.name == "echo-0").unwrap();
        let w = snapshot.workload_by_ip(echo.ip).unwrap();
        assert_eq!(w.protocol, InboundProtocol::Hbone);
        assert_eq!(w.workload_name.as_deref(), Some("echo"));
        let legacy = plan.pods.iter().find(|p| !p.meshed).unwrap();
        assert_eq!(
            snapshot.workload_by_ip(legacy.ip).unwrap().protocol,
            InboundProtocol::Tcp
        );
        let svc = &plan.services[0];
        let target = snapshot
            .service_by_vip(std::net::SocketAddrV4::new(
                svc.cluster_ip,
                svc.ports[0].port,
            ))
            .unwrap();
        assert_eq!(
            snapshot.endpoints(target.service).count(),
            svc.endpoints.len()
        );
    }
}

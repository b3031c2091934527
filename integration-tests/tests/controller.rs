//! The lab's data planes take their config and certificates from the
//! controller: they keep serving while it is down, resync when it returns,
//! and a policy applied meanwhile is enforced once it is back.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::Duration;

use integration_tests::{TestLab, require_root, spec, wait_until};

fn metric(t: &TestLab, name: &str) -> Option<u64> {
    t.lab
        .controller_get("/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn data_planes_serve_through_a_controller_restart_and_resync() {
    if !require_root("data_planes_serve_through_a_controller_restart_and_resync") {
        return;
    }
    let mut spec = spec("it-ctl", 18, 2, 2);
    spec.namespaces[0]
        .labels
        .insert(lab::plan::DATAPLANE_MODE.into(), "ambient".into());
    let t = TestLab::up(spec);
    let plan = t.lab.plan();
    let echo = plan
        .pods
        .iter()
        .find(|p| {
            p.namespace == "app"
                && p.name.starts_with("echo")
                && p.node != plan.pod("app/sleep-0").unwrap().node
        })
        .unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    assert!(t.reaches("app/sleep-0", &url));
    assert_eq!(metric(&t, "ambit_controller_subscribers"), Some(2));
    assert!(metric(&t, "ambit_controller_certificates_signed_total").unwrap() >= 2);
    let full_sync = metric(&t, "ambit_controller_config_sent_bytes_total").unwrap();

    // Controller down: traffic keeps flowing on the config and
    // certificates the ztunnels hold.
    t.lab.stop_controller().unwrap();
    for _ in 0..5 {
        assert!(
            t.reaches("app/sleep-0", &url),
            "traffic stopped with the controller"
        );
    }

    // A DENY for the client lands while the controller is away; it takes
    // effect once the controller is back and the ztunnels resynced.
    t.lab
        .set_policies(
            "apiVersion: security.ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: deny-sleep, namespace: app}\n\
             spec: {action: DENY, rules: [{from: [{source: {serviceAccounts: [app/sleep]}}]}]}\n",
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        t.reaches("app/sleep-0", &url),
        "nobody translated the policy yet"
    );
    t.lab.start_controller().unwrap();
    let ctx = || t.lab.controller_get("/metrics").unwrap_or_default();
    wait_until(
        "both ztunnels resubscribed",
        Duration::from_secs(15),
        ctx,
        || metric(&t, "ambit_controller_subscribers") == Some(2),
    );
    wait_until(
        "the DENY enforced",
        Duration::from_secs(15),
        String::new,
        || !t.reaches("app/sleep-0", &url),
    );
    // Resubscribing ztunnels said what they held: the restarted controller
    // sent each the policy, not the whole config again.
    assert_eq!(metric(&t, "ambit_controller_config_nacks_total"), Some(0));
    let resync = metric(&t, "ambit_controller_config_sent_bytes_total").unwrap();
    assert!(
        resync * 2 < full_sync,
        "resync sent {resync} bytes, the first sync {full_sync}"
    );
    for node in &plan.nodes {
        let log =
            std::fs::read_to_string(t.lab.log_path(&format!("ztunnel/{}", node.name))).unwrap();
        assert!(
            log.contains("config stream lost; serving the last good config"),
            "{log}"
        );
    }
}

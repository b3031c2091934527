//! The real waypoint on loopback (`waypoint::testing`): routes applied to
//! HTTP/1.1 and HTTP/2, other traffic passed on as TCP, destinations that
//! do not use the waypoint refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint::testing::setup;

const ROUTES: &str = r#"  - namespace: demo
    name: echo
    kind: HTTPRoute
    parents: [{service: demo/echo, waypoint: demo/waypoint}]
    rules:
      - matches: [{path: !prefix /v2}]
        filters:
          - !responseHeaders {set: [[x-route, v2]]}
          - !rewrite {path: !prefix /}
        backends: [{service: demo/echo-v2, port: 80, weight: 1}]
      - matches: [{path: !exact /moved}]
        filters: [!redirect {path: !full /new, status: 301}]
      - matches: [{path: !prefix /broken}]
        backends: [{port: 80, weight: 1}]
      - matches: [{path: !exact /flaky}]
        backends: []
        retry: {attempts: 1, codes: [503]}
      - matches: [{path: !exact /slow}]
        backends: []
        timeouts: {backendRequestMs: 300}
      - matches: [{path: !prefix /}]
        filters: [!requestHeaders {add: [[x-through, waypoint]]}]
        backends: []
"#;

#[tokio::test]
async fn routes_apply_to_http_and_other_traffic_passes_as_tcp() {
    let s = setup(1, ROUTES).await;
    for http2 in [false, true] {
        // The last rule: to the Service addressed, with a header added.
        let (status, body, _) = s.get("10.96.0.1:80", "/hello", http2).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "v1 /hello waypoint"),
            "http2 {http2}"
        );
        // A prefix rule to another Service, path rewritten, response
        // header set.
        let (status, body, headers) = s.get("10.96.0.1:80", "/v2/items", http2).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "v2 /items "),
            "http2 {http2}"
        );
        assert_eq!(headers["x-route"], "v2");
        let (status, _, headers) = s.get("10.96.0.1:80", "/moved?a=1", http2).await;
        assert_eq!(status, 301);
        assert_eq!(headers["location"], "http://echo.demo/new?a=1");
        // A backend whose reference did not resolve: 500, as Gateway API
        // asks.
        let (status, body, _) = s.get("10.96.0.1:80", "/broken", http2).await;
        assert_eq!(status, 500, "{body}");
        // The backend fails every other call: the retry resends the body.
        let (status, body, _) = s
            .send("10.96.0.1:80", "POST", "/flaky", "order 42", http2)
            .await;
        assert_eq!((status, body.as_str()), (200, "order 42"), "http2 {http2}");
        // A dot segment does not get past the exact match.
        let (status, body, _) = s
            .send("10.96.0.1:80", "POST", "/x/../flaky", "again", http2)
            .await;
        assert_eq!((status, body.as_str()), (200, "again"), "http2 {http2}");
        let started = std::time::Instant::now();
        let (status, body, _) = s.get("10.96.0.1:80", "/slow", http2).await;
        assert_eq!(status, 504, "{body}");
        // Far sooner than the backend would answer (30 s): the route's
        // timeout, not the backend, ended it.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
    // The route is for every port, but 9000 is declared TCP (by its name):
    // bytes passed on to an endpoint's same port.
    let mut tcp = s.tunnel("10.96.0.1:9000").await.unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    let metrics = s.metrics().await;
    for line in [
        r#"ambit_requests_total{reporter="waypoint",destination_service="demo/echo",route="HTTPRoute demo/echo",response_code="200"} 8"#,
        r#"ambit_requests_total{reporter="waypoint",destination_service="demo/echo",route="HTTPRoute demo/echo",response_code="504"} 2"#,
        r#"ambit_requests_total{reporter="waypoint",destination_service="demo/echo",route="HTTPRoute demo/echo",response_code="301"} 2"#,
        r#"ambit_waypoint_tunnels_total{destination_service="demo/echo",mode="tcp"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    s.waypoint.shutdown().await;
}

#[tokio::test]
async fn destinations_that_do_not_use_the_waypoint_are_refused() {
    let s = setup(2, ROUTES).await;
    // A Service with no waypoint, and an address the mesh does not know.
    for authority in ["10.96.0.3:80", "192.0.2.1:80"] {
        let error = s.tunnel(authority).await.unwrap_err().to_string();
        assert!(error.contains("503"), "{authority}: {error}");
    }
    let metrics = s.metrics().await;
    for line in [
        r#"ambit_waypoint_tunnels_refused_total{destination_service="unknown",reason="not_this_waypoint"} 1"#,
        r#"ambit_waypoint_tunnels_refused_total{destination_service="unknown",reason="unknown_destination"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    s.waypoint.shutdown().await;
}

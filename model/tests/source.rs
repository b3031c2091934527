//! The file source: applied atomically on change, invalid files refused
//! with the last good config kept.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::Duration;

use model::{ConfigSink, ConfigSource, FileSource};
use tokio_util::sync::CancellationToken;

const ONE: &str =
    r#"{"workloads": [{"uid": "a", "name": "a", "namespace": "ns", "ips": ["10.0.0.1"]}]}"#;
const TWO: &str = "
workloads:
  - {uid: a, name: a, namespace: ns, ips: [10.0.0.1]}
  - {uid: b, name: b, namespace: ns, ips: [10.0.0.2]}
";

async fn wait_for(sink: &ConfigSink, check: impl Fn(&model::Snapshot) -> bool) {
    let mut rx = sink.subscribe();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| check(s)))
        .await
        .expect("config never arrived")
        .unwrap();
}

/// A source of `path` that looks for changes every 20 ms.
fn quick_source(path: &std::path::Path) -> FileSource {
    let mut source = FileSource::new(path.to_path_buf());
    source.poll = Duration::from_millis(20);
    source
}

/// The version read to start with is not applied (or refused) again
/// when the watch begins; the next change is.
#[tokio::test]
async fn the_file_read_first_is_not_read_again_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    for (first, refused) in [(ONE, 0), ("workloads: [", 1)] {
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, first).unwrap();
        let sink = ConfigSink::new();
        let stop = CancellationToken::new();
        let mut source = quick_source(&path);
        let _ = match source.read_first() {
            Ok(config) => sink.apply(config),
            Err(error) => sink.refuse(error),
        };
        let version = sink.current().version();
        let task = tokio::spawn(Box::new(source).run(sink.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.current().version(), version, "{first}");
        assert_eq!(sink.rejected(), refused, "{first}");
        std::fs::write(&path, TWO).unwrap();
        wait_for(&sink, |s| s.config().workloads.len() == 2).await;
        stop.cancel();
        task.await.unwrap();
    }
}

#[tokio::test]
async fn file_changes_are_applied_and_bad_files_keep_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, ONE).unwrap();
    let sink = ConfigSink::new();
    let stop = CancellationToken::new();
    let source = quick_source(&path);
    let task = tokio::spawn(Box::new(source).run(sink.clone(), stop.clone()));

    wait_for(&sink, |s| s.config().workloads.len() == 1).await;
    let first = sink.current().version();

    // Syntax error, then a semantic error: both refused, nothing changes.
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::fs::write(&path, "workloads: [").unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while sink.rejected() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::fs::write(&path, TWO.replace("10.0.0.2", "10.0.0.1")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while sink.rejected() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    // No document at all (a file caught while it is rewritten, or only a
    // comment): refused, not read as a config with nothing in it.
    for (i, text) in ["", "# nothing yet\n"].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(30)).await;
        std::fs::write(&path, text).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while sink.rejected() < 3 + i as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
    }
    assert_eq!(sink.current().version(), first);
    assert_eq!(sink.current().config().workloads.len(), 1);

    // A good file again: applied whole.
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::fs::write(&path, TWO).unwrap();
    wait_for(&sink, |s| s.config().workloads.len() == 2).await;
    assert!(sink.current().version() > first);
    stop.cancel();
    task.await.unwrap();
}

/// A file written in place in several writes is read only once it has
/// stopped changing: a poll that catches it half-way, with valid YAML that
/// lacks the rest (here workloads; in practice a policy), does not apply
/// it.
#[tokio::test]
async fn a_file_written_in_place_is_applied_once_complete() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let sink = ConfigSink::new();
    let stop = CancellationToken::new();
    let mut source = FileSource::new(path.clone());
    source.poll = Duration::from_millis(250);
    let task = tokio::spawn(Box::new(source).run(sink.clone(), stop.clone()));

    // The writing takes longer than a poll, so polls see it half-way; no
    // state of the file stays for a whole poll until the last.
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(file, "workloads:").unwrap();
    for i in 1..=8 {
        writeln!(
            file,
            "  - {{uid: w{i}, name: w{i}, namespace: ns, ips: [10.0.0.{i}]}}"
        )
        .unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(&sink, |s| s.config().workloads.len() == 8).await;
    // Only the complete file was ever read: one version, nothing refused.
    assert_eq!(sink.current().version(), 1);
    assert_eq!(sink.rejected(), 0);
    stop.cancel();
    task.await.unwrap();
}

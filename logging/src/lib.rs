//! Log set-up of Ambit's proxies (ztunnel and waypoint): one line per
//! event on stdout, as text or as JSON objects, under a filter that can be
//! changed at run time.
//!
//! The access log (events of target `access`, one per connection or
//! request) is kept at `info` whatever the filter says, unless the filter
//! names the `access` target itself: turning the level down to `warn` to
//! quiet a busy node must not also drop the record of who connected to
//! whom. `access=off` turns it off.

use std::sync::{Mutex, PoisonError};

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The target of access-log events.
pub const ACCESS: &str = "access";

/// How each event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Format {
    /// `tracing`'s human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, the event's fields at the top level
    /// beside `timestamp`, `level`, `target` and `message`.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error(
        "empty log filter: it would turn off every log but the access log; give a level such as info"
    )]
    Empty,
    #[error(
        "unknown log level {0:?}: give one of trace, debug, info, warn, error or off, or target=level"
    )]
    UnknownLevel(String),
    #[error("cannot change the log filter: {0}")]
    Reload(#[from] reload::Error),
    #[error("a global log subscriber is already installed: {0}")]
    Install(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// The filter `filter` with the access log kept at `info` when it does not
/// name the `access` target.
pub fn with_access_log(filter: &str) -> String {
    let names_access = filter.split(',').any(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or("").trim();
        target == ACCESS || target.starts_with("access::")
    });
    match (names_access, filter.trim().is_empty()) {
        (true, _) => filter.to_string(),
        (false, true) => format!("{ACCESS}=info"),
        (false, false) => format!("{filter},{ACCESS}=info"),
    }
}

/// The hold on a subscriber's filter: what it is, and changing it.
#[derive(Debug)]
pub struct Logging {
    reload: reload::Handle<EnvFilter, Registry>,
    /// The filter in force, as [`with_access_log`] made it.
    current: Mutex<String>,
}

impl Logging {
    /// Installs the process's subscriber, writing to stdout.
    pub fn init(format: Format, filter: &str) -> Result<Logging, Error> {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let (subscriber, logging) = build(format, filter, std::io::stdout, ansi)?;
        tracing::subscriber::set_global_default(subscriber)?;
        Ok(logging)
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter; returns the one now in force. An invalid
    /// filter changes nothing.
    pub fn set(&self, filter: &str) -> Result<String, Error> {
        // Most likely a mistake (`?level=`), and one that would leave a
        // node silent about its errors.
        if filter.trim().is_empty() {
            return Err(Error::Empty);
        }
        let effective = with_access_log(filter);
        let parsed = parse(filter, &effective)?;
        self.reload.reload(parsed)?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = effective.clone();
        tracing::info!(filter = %effective, "log filter changed");
        Ok(effective)
    }
}

/// A subscriber writing to `writer`, not installed: [`Logging::init`]
/// installs one on stdout, tests read what one writes.
pub fn build<W>(
    format: Format,
    filter: &str,
    writer: W,
    ansi: bool,
) -> Result<(Box<dyn Subscriber + Send + Sync>, Logging), Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let effective = with_access_log(filter);
    let (filter, reload) = reload::Layer::new(parse(filter, &effective)?);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let subscriber: Box<dyn Subscriber + Send + Sync> = match format {
        Format::Text => Box::new(registry.with(fmt.with_ansi(ansi))),
        Format::Json => Box::new(registry.with(fmt.json().flatten_event(true))),
    };
    let logging = Logging {
        reload,
        current: Mutex::new(effective),
    };
    Ok((subscriber, logging))
}

/// The levels a directive without `=` may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// `effective` parsed; an error names `filter`, the one the user gave.
fn parse(filter: &str, effective: &str) -> Result<EnvFilter, Error> {
    // A bare word that is not a level is a target at every level to
    // `EnvFilter`, with every other target off: `warning` would silence
    // the node's errors. A target alone is written `target=trace`.
    if let Some(word) = filter.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '['])
            && !LEVELS.iter().any(|level| d.eq_ignore_ascii_case(level))
    }) {
        return Err(Error::UnknownLevel(word.to_string()));
    }
    EnvFilter::try_new(effective).map_err(|source| Error::Filter {
        filter: filter.to_string(),
        source,
    })
}

/// A writer whose lines tests read back.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    /// Everything written to it, shared by its clones.
    #[derive(Debug, Clone, Default)]
    pub struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        /// The lines written so far.
        pub fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_string).collect()
        }
    }

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use super::testing::Buffer;
    use super::*;

    #[test]
    fn a_word_that_is_not_a_level_is_refused() {
        for filter in ["warning", "info,verbose", "debugg"] {
            let built = build(Format::Text, filter, Buffer::default(), false);
            assert!(matches!(built, Err(Error::UnknownLevel(_))), "{filter}");
        }
        // The subscriber kept: a filter is reloaded into it.
        let (_subscriber, logging) = build(Format::Text, "info", Buffer::default(), false).unwrap();
        let err = logging.set("warning").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown log level \"warning\": give one of trace, debug, info, warn, error or off, or target=level"
        );
        assert_eq!(logging.current(), "info,access=info");
        for filter in [
            "WARN",
            "debug,hbone=trace",
            "off",
            "access=off",
            "info,h2[conn]=debug",
        ] {
            assert!(logging.set(filter).is_ok(), "{filter}");
        }
    }

    #[test]
    fn the_access_log_stays_at_info_unless_the_filter_names_it() {
        assert_eq!(with_access_log("warn"), "warn,access=info");
        assert_eq!(
            with_access_log("info,hbone=debug"),
            "info,hbone=debug,access=info"
        );
        assert_eq!(with_access_log(""), "access=info");
        assert_eq!(with_access_log("warn,access=off"), "warn,access=off");
        assert_eq!(with_access_log("access"), "access");
        assert_eq!(
            with_access_log("warn, access = debug"),
            "warn, access = debug"
        );
        assert_eq!(with_access_log("access[conn]=trace"), "access[conn]=trace");
        // Targets that only begin with the word are other targets.
        assert_eq!(with_access_log("accessor=off"), "accessor=off,access=info");
    }

    #[test]
    fn under_warn_json_lines_carry_the_access_log_and_drop_other_info() {
        let out = Buffer::default();
        let (subscriber, _logging) = build(Format::Json, "warn", out.clone(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("routine");
            tracing::info!(
                target: ACCESS,
                src_addr = "10.0.0.1:40000",
                bytes_sent = 1024u64,
                "connection complete"
            );
            tracing::warn!("trouble");
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let access = &lines[0];
        assert_eq!(access["target"], ACCESS);
        assert_eq!(access["level"], "INFO");
        assert_eq!(access["message"], "connection complete");
        assert_eq!(access["src_addr"], "10.0.0.1:40000");
        assert_eq!(access["bytes_sent"], 1024);
        assert_eq!(lines[1]["message"], "trouble");
    }

    #[test]
    fn a_changed_filter_applies_at_once_and_an_invalid_one_changes_nothing() {
        let out = Buffer::default();
        let (subscriber, logging) = build(Format::Text, "info", out.clone(), false).unwrap();
        assert_eq!(logging.current(), "info,access=info");
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(logging.set("error").unwrap(), "error,access=info");
            tracing::warn!("hidden");
            tracing::info!(target: ACCESS, "kept");
            let error = logging.set("ztunnel=loud").unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("invalid log filter \"ztunnel=loud\": "),
                "{error}"
            );
            assert_eq!(logging.current(), "error,access=info");
            assert!(matches!(logging.set(" "), Err(Error::Empty)));
            assert_eq!(logging.current(), "error,access=info");
            logging.set("error,access=off").unwrap();
            tracing::info!(target: ACCESS, "dropped");
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("kept"), "{lines:?}");
    }
}

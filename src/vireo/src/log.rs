//! vireo's tracing subscriber: one line per event, `<UTC time> <LEVEL> <message> [file:line]`,
//! filtered by level and optionally by module, all changeable by `PUT /logger`.
//!
//! vireo records no spans, so it keeps no span storage: tracing-subscriber's registry
//! allocates (and zeroes) a 32 KiB table per process, which counts when thousands of VMs share
//! a host.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};

/// Where lines go (set once at start-up; the sink itself may change).
pub trait Sink: Send + Sync + 'static {
    /// Writes one whole line.
    fn write_line(&self, line: &[u8]);
}

/// The subscriber's settings.
pub struct Logger<S> {
    sink: S,
    /// 0 off, 1 error ... 5 trace.
    level: AtomicU8,
    show_level: AtomicBool,
    show_origin: AtomicBool,
    /// Only messages from this module (and below) when set.
    module: Mutex<Option<String>>,
}

fn rank(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

fn filter_rank(f: LevelFilter) -> u8 {
    f.into_level().map_or(0, |l| rank(&l))
}

impl<S: Sink> Logger<S> {
    /// A logger writing to `sink` at `level`, levels shown, origins not.
    pub fn new(sink: S, level: LevelFilter) -> Self {
        Self {
            sink,
            level: AtomicU8::new(filter_rank(level)),
            show_level: AtomicBool::new(true),
            show_origin: AtomicBool::new(false),
            module: Mutex::new(None),
        }
    }

    /// Applies `PUT /logger`'s settings.
    pub fn configure(
        &self,
        level: LevelFilter,
        module: Option<String>,
        show_level: bool,
        show_origin: bool,
    ) {
        self.level.store(filter_rank(level), Ordering::SeqCst);
        self.show_level.store(show_level, Ordering::SeqCst);
        self.show_origin.store(show_origin, Ordering::SeqCst);
        *self.module.lock().unwrap_or_else(|e| e.into_inner()) = module;
        // Callsites cache the process-wide maximum level.
        tracing::callsite::rebuild_interest_cache();
    }

    fn format(&self, event: &Event<'_>) -> String {
        let meta = event.metadata();
        let mut line = String::with_capacity(128);
        utc_now(&mut line);
        if self.show_level.load(Ordering::Relaxed) {
            let _ = write!(line, " {:>5}", meta.level().as_str());
        }
        line.push(' ');
        event.record(&mut Fields(&mut line));
        if self.show_origin.load(Ordering::Relaxed) {
            if let (Some(file), Some(n)) = (meta.file(), meta.line()) {
                let _ = write!(line, " [{file}:{n}]");
            }
        }
        line.push('\n');
        line
    }
}

/// The message first, then the other fields as ` name=value`.
struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// Appends the current UTC time as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`.
fn utc_now(out: &mut String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_micros()
    );
}

impl<S: Sink> tracing::Subscriber for Logger<S> {
    fn register_callsite(&self, _meta: &'static Metadata<'static>) -> Interest {
        // Asked at every event: the level and module change at run time.
        Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        if rank(meta.level()) > self.level.load(Ordering::Relaxed) {
            return false;
        }
        match self
            .module
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
        {
            None => true,
            Some(m) => meta
                .target()
                .strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::")),
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match self.level.load(Ordering::Relaxed) {
            0 => LevelFilter::OFF,
            1 => LevelFilter::ERROR,
            2 => LevelFilter::WARN,
            3 => LevelFilter::INFO,
            4 => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        self.sink.write_line(self.format(event).as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl Sink for Lines {
        fn write_line(&self, line: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(line).into_owned());
        }
    }

    #[test]
    fn lines_follow_the_settings() {
        let lines = Lines::default();
        let logger = Arc::new(Logger::new(lines.clone(), LevelFilter::INFO));
        let dispatch = tracing::Dispatch::from(logger.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(n = 3, "hello {}", "there");
            tracing::debug!("hidden");
            logger.configure(LevelFilter::DEBUG, None, false, true);
            tracing::debug!("shown");
            logger.configure(LevelFilter::TRACE, Some("elsewhere".into()), true, false);
            tracing::error!("filtered by module");
        });
        let got = lines.0.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "{got:?}");
        // 2026-12-02T16:00:00.123456Z  INFO hello there n=3
        let first = &got[0];
        assert_eq!(&first[4..5], "-", "{first}");
        assert_eq!(&first[26..27], "Z", "{first}");
        assert!(first.ends_with("  INFO hello there n=3\n"), "{first}");
        assert!(
            got[1].contains("Z shown [src/vireo/src/log.rs:"),
            "{}",
            got[1]
        );
        assert!(!got[1].contains("DEBUG"), "{}", got[1]);
    }

    #[test]
    fn dates_are_civil_dates() {
        let mut s = String::new();
        utc_now(&mut s);
        let year: i32 = s[..4].parse().unwrap();
        assert!((2024..2200).contains(&year), "{s}");
        let month: u32 = s[5..7].parse().unwrap();
        let day: u32 = s[8..10].parse().unwrap();
        assert!((1..=12).contains(&month) && (1..=31).contains(&day), "{s}");
    }
}

//! Logs and metrics: where they go and what they count, set by flags, `PUT /logger` and
//! `PUT /metrics`.

use serde_json::json;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use utils::seccomp::Allow;

/// What the metrics thread calls beyond every thread's basics (which already hold its sleep
/// and its writes to the metrics file): nothing.
pub const METRICS_SECCOMP: Allow = Allow {
    by: "the metrics writer",
    syscalls: &[],
    with_arg: &[],
};
use tracing::level_filters::LevelFilter;
use vmm::controller::Telemetry;
use vmm::resources::{LoggerConfig, MetricsConfig};

/// Lines dropped because the log sink was full or broken.
static LOST_LOGS: AtomicU64 = AtomicU64::new(0);

/// Where log lines go: stderr until `PUT /logger` names a file or FIFO.
#[derive(Clone, Default)]
pub struct LogSink(Arc<Mutex<Option<File>>>);

impl crate::log::Sink for LogSink {
    fn write_line(&self, line: &[u8]) {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let result = match guard.as_mut() {
            Some(f) => f.write_all(line),
            None => std::io::stderr().write_all(line),
        };
        if result.is_err() {
            // A full FIFO or a vanished reader must not block or stop vireo.
            LOST_LOGS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Opens a log or metrics destination: appended to if a file; a named pipe is opened so that
/// neither the open nor later writes block when nobody reads (full pipe: the line is counted
/// as lost).
fn open_sink(path: &str) -> Result<File, String> {
    utils::files::open_output(std::path::Path::new(path), false)
        .map_err(|e| format!("cannot open {path}: {e}"))
}

/// What `PUT /logger` changes: the process's subscriber.
pub type LogControl = Arc<crate::log::Logger<LogSink>>;

/// Installs the process's tracing subscriber at `level`; returns what `PUT /logger` changes.
pub fn init_logging(level: tracing::Level) -> (LogSink, LogControl) {
    let sink = LogSink::default();
    let logger = Arc::new(crate::log::Logger::new(
        sink.clone(),
        LevelFilter::from_level(level),
    ));
    let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::new(logger.clone()));
    (sink, logger)
}

/// The binary's side of [`Telemetry`].
pub struct ProcessTelemetry {
    id: String,
    sink: LogSink,
    log: LogControl,
    level: LevelFilter,
    metrics: Arc<Mutex<Option<File>>>,
    counters: Arc<Counters>,
    started: Instant,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    flushes: AtomicU64,
    lost_metrics: AtomicU64,
    guest_resets: AtomicU64,
    guest_power_offs: AtomicU64,
    startup_us: AtomicU64,
    startup_cpu_us: AtomicU64,
    emit_id: std::sync::atomic::AtomicBool,
}

/// Microseconds on `clock` (CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID), as Firecracker's
/// jailer measures the times it passes.
fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes only the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// How often metrics are written once a path is set.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Ok(LevelFilter::ERROR),
        "warning" | "warn" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        "off" => Ok(LevelFilter::OFF),
        _ => Err(format!(
            "logger level '{s}' is not one of Error, Warning, Info, Debug, Trace, Off"
        )),
    }
}

impl ProcessTelemetry {
    /// Telemetry over the subscriber from [`init_logging`], which was set to `level`.
    pub fn new(id: String, sink: LogSink, log: LogControl, level: tracing::Level) -> Self {
        Self {
            id,
            sink,
            log,
            level: LevelFilter::from_level(level),
            metrics: Default::default(),
            counters: Default::default(),
            started: Instant::now(),
        }
    }

    /// Counts a request answered by the API thread itself (malformed, unknown, refused).
    pub fn reject_hook(&self) -> Arc<dyn Fn() + Send + Sync> {
        let counters = self.counters.clone();
        Arc::new(move || {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters.failed_requests.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// Firecracker's `--start-time-us`, `--start-time-cpu-us` and `--parent-cpu-time-us`:
    /// the process's start-up time (until now, when the API is about to serve) goes into the
    /// metrics as Firecracker reports it.
    pub fn set_startup_times(
        &self,
        start_us: Option<u64>,
        cpu_us: Option<u64>,
        parent_cpu_us: Option<u64>,
    ) {
        if let Some(start) = start_us {
            let us = clock_us(libc::CLOCK_MONOTONIC).saturating_sub(start);
            self.counters.startup_us.store(us, Ordering::Relaxed);
            tracing::info!("process start-up took {us} us");
        }
        if let Some(start) = cpu_us {
            let us = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start)
                + parent_cpu_us.unwrap_or(0);
            self.counters.startup_cpu_us.store(us, Ordering::Relaxed);
            tracing::info!("process start-up took {us} us of CPU time");
        }
    }

    fn write_metrics(
        metrics: &Mutex<Option<File>>,
        counters: &Counters,
        started: Instant,
        id: &str,
    ) {
        let mut devices = serde_json::Map::new();
        for (name, m) in devices::metrics::all() {
            let counters: serde_json::Map<String, serde_json::Value> =
                m.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            devices.insert(name, serde_json::Value::Object(counters));
        }
        let (pio, mmio, other) = vmm::vstate::vcpu::exit_counts();
        let limited: serde_json::Map<String, serde_json::Value> = utils::ratelimit::counts()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect();
        let mut line = json!({
            "devices": devices,
            "vcpu": { "exits_io": pio, "exits_mmio": mmio, "exits_other": other },
            "utc_timestamp_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "api_server": {
                "requests": counters.requests.load(Ordering::Relaxed),
                "failed_requests": counters.failed_requests.load(Ordering::Relaxed),
                "process_startup_time_us": counters.startup_us.load(Ordering::Relaxed),
                "process_startup_time_cpu_us": counters.startup_cpu_us.load(Ordering::Relaxed),
            },
            "vmm": {
                "uptime_ms": started.elapsed().as_millis() as u64,
                "guest_resets": counters.guest_resets.load(Ordering::Relaxed),
                "guest_power_offs": counters.guest_power_offs.load(Ordering::Relaxed),
            },
            "snapshot": vmm::persist::metrics()
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "events": limited,
            "logger": { "lost_logs": LOST_LOGS.load(Ordering::Relaxed) },
            "metrics": {
                "flushes": counters.flushes.fetch_add(1, Ordering::Relaxed) + 1,
                "lost_metrics": counters.lost_metrics.load(Ordering::Relaxed),
            },
        });
        if counters.emit_id.load(Ordering::Relaxed) {
            line["id"] = json!(id);
        }
        let mut guard = metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = guard.as_mut() {
            if writeln!(f, "{line}").is_err() {
                counters.lost_metrics.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Telemetry for ProcessTelemetry {
    fn configure_logger(&mut self, cfg: &LoggerConfig) -> Result<(), String> {
        let level = cfg.level.as_deref().map(parse_level).transpose()?;
        let file = cfg.log_path.as_deref().map(open_sink).transpose()?;
        if let Some(level) = level {
            self.level = level;
        }
        // A module filter keeps only that module's messages (Firecracker's semantics).
        self.log.configure(
            self.level,
            cfg.module.clone(),
            cfg.show_level.unwrap_or(true),
            cfg.show_log_origin.unwrap_or(false),
        );
        if let Some(f) = file {
            // A forbidden system call is reported in the log file too.
            utils::seccomp::set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&f));
            *self.sink.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        }
        Ok(())
    }

    fn configure_metrics(&mut self, cfg: &MetricsConfig) -> Result<(), String> {
        let file = open_sink(&cfg.metrics_path)?;
        self.counters
            .emit_id
            .store(cfg.emit_id.unwrap_or(false), Ordering::Relaxed);
        let first = self
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(file)
            .is_none();
        if first {
            let (metrics, counters) = (self.metrics.clone(), self.counters.clone());
            let started = self.started;
            let id = self.id.clone();
            let _ = std::thread::Builder::new()
                .name("metrics".into())
                .stack_size(64 << 10)
                .spawn(move || {
                    utils::seccomp::filter(utils::seccomp::ThreadKind::Metrics).install();
                    loop {
                        std::thread::sleep(METRICS_PERIOD);
                        Self::write_metrics(&metrics, &counters, started, &id);
                    }
                });
        }
        Ok(())
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        if self
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Err("FlushMetrics: no metrics path configured (PUT /metrics first)".into());
        }
        Self::write_metrics(&self.metrics, &self.counters, self.started, &self.id);
        Ok(())
    }

    fn vm_ended(&mut self, reason: &vmm::ExitReason) {
        let counter = match reason {
            vmm::ExitReason::Reset => &self.counters.guest_resets,
            vmm::ExitReason::PowerOff(_) => &self.counters.guest_power_offs,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // The last word on how the VM ended, as Firecracker writes metrics at exit.
        Self::write_metrics(&self.metrics, &self.counters, self.started, &self.id);
    }

    fn record_request(&mut self, ok: bool) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.counters
                .failed_requests
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

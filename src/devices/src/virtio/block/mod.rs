//! virtio-blk (virtio 1.2, 5.2) backed by a host file: read, write, flush, GET_ID, DISCARD and
//! WRITE_ZEROES, read-only enforcement, seg_max/size_max, one request queue.

pub mod disk;
pub mod persist;
pub mod request;
#[cfg(test)]
mod tests;
pub mod uring;

use super::worker::{Completed, QueueHandler, Served, Worker};
use super::{features, ActivateContext, ActivateError, GuestMemoryMmap, VirtioDevice};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use disk::Disk;
use request::{outcome, Limits, Request, ID_BYTES};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use uring::Ring;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

/// What replacing a drive's backing file calls (on the VMM thread, PATCH /drives): the open,
/// and a seek to find a block device's size.
pub const REPLACE_SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "replacing a drive's backing file",
    syscalls: &[libc::SYS_lseek],
    with_arg: &[],
};

/// What a block device thread calls on its disk: positioned vectored I/O, flush, discard and
/// write-zeroes.
pub const SECCOMP: utils::seccomp::Allow = utils::seccomp::Allow {
    by: "virtio-blk",
    syscalls: &[
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        // The Async engine's ring (made on the VMM thread, restricted to the image).
        libc::SYS_io_uring_enter,
        // The rate limiter's timer.
        libc::SYS_timerfd_settime,
    ],
    with_arg: &[],
};

/// Request queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment the device accepts (and advertises as size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request: what fits in the queue next to header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most ranges per DISCARD / WRITE_ZEROES request.
pub const MAX_RANGES: u32 = 16;
/// Most sectors per DISCARD / WRITE_ZEROES range (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;

/// How a drive's requests reach its image (Firecracker's `io_engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    /// One request at a time, by blocking vectored reads and writes on the device thread.
    #[default]
    Sync,
    /// Many requests in flight on an io_uring (see [`uring`]).
    Async,
}

impl std::str::FromStr for IoEngine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Sync" | "sync" => Ok(IoEngine::Sync),
            "Async" | "async" => Ok(IoEngine::Async),
            _ => Err(format!("io_engine {s}: expected Sync or Async")),
        }
    }
}

/// A drive as the user configured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Disk image.
    pub path: PathBuf,
    /// ID returned by GET_ID (at most 20 bytes).
    pub id: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Bandwidth and request-rate limits (none by default).
    pub rate_limiter: RateLimiterConfig,
    /// How requests reach the image.
    pub io_engine: IoEngine,
}

/// Errors creating a block device.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open drive image {path}: {err}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The ID does not fit GET_ID's 20 bytes.
    #[error("drive id '{0}' is longer than 20 bytes")]
    IdTooLong(String),
    /// The Async engine cannot run here.
    #[error("drive image {path}: io_engine Async: {reason}")]
    Engine {
        /// The image.
        path: PathBuf,
        /// What is missing, and what to do.
        reason: String,
    },
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    // Shared with the device thread; replacing the image swaps it under the lock, which the
    // thread otherwise holds alone (uncontended) for each request.
    disk: Arc<Mutex<Disk>>,
    features: u64,
    config_space: Vec<u8>,
    worker: Option<Worker>,
    metrics: std::sync::Arc<crate::metrics::DeviceMetrics>,
    // Shared with the device thread, so PATCH can change the limits of a running drive.
    limiter: Arc<Mutex<RateLimiter>>,
    /// Async engine: the eventfd every ring of this drive signals completions on.
    completions: Option<EventFd>,
    /// Async engine: a ring made on the VMM thread for the current image, not yet taken by a
    /// device thread (the first activation takes it; a running thread switches to a
    /// replacement image's ring once its requests on the old one have ended).
    next_ring: Arc<Mutex<Option<Ring>>>,
}

fn feature(bit: u32) -> u64 {
    1 << bit
}

/// A drive image: a regular file or a block device, checked before and after a non-blocking
/// open, then used in blocking mode (see [`utils::files::open_input`]).
fn open_image(path: &std::path::Path, read_only: bool) -> std::io::Result<std::fs::File> {
    utils::files::open_input(path, utils::files::Kind::Image, !read_only)
}

impl Block {
    /// Opens the image of `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        if config.id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(config.id.clone()));
        }
        let file = open_image(&config.path, config.read_only).map_err(|err| BlockError::Open {
            path: config.path.clone(),
            err,
        })?;
        let disk = Disk::new(file).map_err(|err| BlockError::Open {
            path: config.path.clone(),
            err,
        })?;
        let mut features = features::COMMON
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if config.read_only {
            features |= feature(VIRTIO_BLK_F_RO);
        } else {
            features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config_space = Self::config_image(disk.sectors());
        let limiter = RateLimiter::new(&config.rate_limiter).map_err(|err| BlockError::Open {
            path: config.path.clone(),
            err,
        })?;
        let (completions, ring) = match config.io_engine {
            IoEngine::Sync => (None, None),
            IoEngine::Async => {
                let engine_error = |err: std::io::Error| BlockError::Engine {
                    path: config.path.clone(),
                    reason: uring::explain(&err),
                };
                let completions = EventFd::new(libc::EFD_NONBLOCK).map_err(engine_error)?;
                let ring = Ring::new(disk.file(), u32::from(QUEUE_SIZE), &completions)
                    .map_err(engine_error)?;
                (Some(completions), Some(ring))
            }
        };
        Ok(Self {
            completions,
            next_ring: Arc::new(Mutex::new(ring)),
            limiter: Arc::new(Mutex::new(limiter)),
            disk: Arc::new(Mutex::new(disk)),
            features,
            config_space,
            worker: None,
            metrics: crate::metrics::register(format!("block_{}", config.id)),
            config,
        })
    }

    /// struct virtio_blk_config, little-endian.
    fn config_image(sectors: u64) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&sectors.to_le_bytes()); // capacity
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(disk::SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// The request loop the device thread runs (the fuzz targets drive it directly).
    pub(crate) fn handler(&self) -> Handler {
        Handler {
            disk: self.disk.clone(),
            read_only: self.config.read_only,
            id: self.id_bytes(),
            limits: Limits {
                seg_max: SEG_MAX,
                size_max: SIZE_MAX,
                max_ranges: MAX_RANGES,
                max_range_sectors: MAX_RANGE_SECTORS,
            },
            metrics: self.metrics.clone(),
            limiter: self.limiter.clone(),
            engine: None,
            next_ring: self.next_ring.clone(),
            reaped: Vec::new(),
        }
    }

    /// The Async engine for a device thread: the ring waiting for it, or a new one.
    fn engine(&self) -> Result<Option<uring::Engine>, String> {
        let Some(completions) = &self.completions else {
            return Ok(None);
        };
        let ring = match crate::bus::lock(&self.next_ring).take() {
            Some(ring) => ring,
            None => Ring::new(
                crate::bus::lock(&self.disk).file(),
                u32::from(QUEUE_SIZE),
                completions,
            )
            .map_err(|e| uring::explain(&e))?,
        };
        let completions = completions.try_clone().map_err(|e| e.to_string())?;
        Ok(Some(uring::Engine::new(
            ring,
            usize::from(QUEUE_SIZE),
            completions,
        )))
    }

    fn id_bytes(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        id[..self.config.id.len()].copy_from_slice(self.config.id.as_bytes());
        id
    }
}

/// The request loop's state, owned by the device thread while the device is active.
pub(crate) struct Handler {
    disk: Arc<Mutex<Disk>>,
    read_only: bool,
    id: [u8; ID_BYTES],
    limits: Limits,
    metrics: std::sync::Arc<crate::metrics::DeviceMetrics>,
    limiter: Arc<Mutex<RateLimiter>>,
    /// The Async engine; `None` runs each request at once (Sync).
    engine: Option<uring::Engine>,
    next_ring: Arc<Mutex<Option<Ring>>>,
    /// Requests that ended while the engine switched rings, reported with the next batch.
    reaped: Vec<uring::Finished>,
}

impl Handler {
    /// Counts a request's outcome and writes its status byte; returns the used length.
    fn report(
        &self,
        mem: &GuestMemoryMmap,
        kind: u32,
        data_len: u64,
        (status, len): (u8, u32),
        status_addr: vm_memory::GuestAddress,
    ) -> u32 {
        use crate::metrics::add;
        if status != VIRTIO_BLK_S_OK as u8 {
            add(&self.metrics.errors, 1);
        } else {
            match kind {
                VIRTIO_BLK_T_IN => add(&self.metrics.read_bytes, u64::from(len - 1)),
                VIRTIO_BLK_T_OUT => add(&self.metrics.write_bytes, data_len),
                VIRTIO_BLK_T_FLUSH => add(&self.metrics.flushes, 1),
                _ => {}
            }
        }
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        len
    }
}

impl QueueHandler for Handler {
    fn handle(
        &mut self,
        queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Served {
        use crate::metrics::add;
        let head = chain.head_index();
        let request = match Request::parse(chain, mem) {
            Ok(r) => r,
            Err((e, status)) => {
                add(&self.metrics.requests, 1);
                add(&self.metrics.errors, 1);
                utils::warn_limited!(
                    "virtio_blk_bad_request",
                    "virtio-blk: malformed request: {e:?}"
                );
                // Fail it with IOERR if it has a writable last byte; otherwise nothing can be
                // reported and the chain goes back with nothing written.
                return Served::Used(match status {
                    Some(addr) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, addr).is_ok() => 1,
                    _ => 0,
                });
            }
        };
        // Reads and writes pay for their bytes; every request pays one operation.
        let bytes = match request.kind() {
            VIRTIO_BLK_T_IN => request.read_len(),
            VIRTIO_BLK_T_OUT => request.data_len(),
            _ => 0,
        };
        if !crate::bus::lock(&self.limiter).consume(bytes) {
            add(&self.metrics.throttled, 1);
            return Served::Throttled;
        }
        add(&self.metrics.requests, 1);
        if let Some(engine) = &mut self.engine {
            // The disk and its ring change together, under the disk's lock.
            let disk = crate::bus::lock(&self.disk);
            if let Some(ring) = crate::bus::lock(&self.next_ring).take() {
                // The image was replaced: what is in flight ends on the old one first.
                engine.replace(ring, &mut self.reaped);
                engine.poke();
            }
            let sectors = disk.sectors();
            drop(disk);
            if let Some(Ok(io)) = request.io(sectors, self.read_only, &self.limits) {
                let status = request.status_addr();
                let result = match engine.start(mem, queue, head, request.sector(), status, io) {
                    Ok(()) => return Served::InFlight,
                    Err(result) => outcome(io.kind(), request.sector(), io.data_len(), result),
                };
                return Served::Used(self.report(mem, io.kind(), io.data_len(), result, status));
            }
        }
        let result = request.execute(
            &mut crate::bus::lock(&self.disk),
            mem,
            self.read_only,
            &self.id,
            &self.limits,
        );
        Served::Used(self.report(
            mem,
            request.kind(),
            request.data_len(),
            result,
            request.status_addr(),
        ))
    }

    fn submit(&mut self) {
        if let Some(engine) = &mut self.engine {
            engine.submit();
        }
    }

    fn completions(&self) -> Option<std::os::fd::RawFd> {
        self.engine.as_ref().map(uring::Engine::completions_fd)
    }

    fn complete(&mut self, mem: &GuestMemoryMmap, wait: bool, done: &mut Vec<Completed>) {
        let mut finished = std::mem::take(&mut self.reaped);
        if let Some(engine) = &mut self.engine {
            engine.reap(wait, &mut finished);
        }
        for f in finished {
            let result = outcome(f.kind, f.sector, f.len, f.result);
            let used = self.report(mem, f.kind, f.len, result, f.status);
            done.push((f.queue, f.head, used));
        }
    }

    fn limiter_timer(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(
            crate::bus::lock(&self.limiter).timer(),
        ))
    }

    fn on_limiter_timer(&mut self) {
        crate::bus::lock(&self.limiter).on_timer();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_image(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut handler = self.handler();
        handler.engine = self.engine().map_err(|e| {
            ActivateError::EventLoop(format!("drive '{}': io_engine Async: {e}", self.config.id))
        })?;
        self.worker = Some(Worker::spawn("virtio-blk", handler, ctx)?);
        Ok(())
    }

    fn worker(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).unwrap_or_default()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: persist::BlockState = serde_json::from_value(state.clone())
            .map_err(|e| format!("drive '{}': bad snapshot state: {e}", self.config.id))?;
        self.check_state(&state)
    }

    fn update_rate_limiter(&mut self, config: &RateLimiterConfig) -> Result<(), String> {
        crate::bus::lock(&self.limiter)
            .update(config)
            .map_err(|e| {
                format!(
                    "drive '{}': cannot change its rate limiter: {e}",
                    self.config.id
                )
            })?;
        self.config.rate_limiter = *config;
        Ok(())
    }

    fn replace_backing(&mut self, path: &std::path::Path) -> Result<(), String> {
        let file = open_image(path, self.config.read_only)
            .map_err(|e| format!("cannot open drive image {}: {e}", path.display()))?;
        let disk = Disk::new(file)
            .map_err(|e| format!("cannot read drive image {}: {e}", path.display()))?;
        let ring = match &self.completions {
            Some(completions) => Some(
                Ring::new(disk.file(), u32::from(QUEUE_SIZE), completions).map_err(|e| {
                    format!(
                        "drive image {}: io_engine Async: {}",
                        path.display(),
                        uring::explain(&e)
                    )
                })?,
            ),
            None => None,
        };
        self.config_space = Self::config_image(disk.sectors());
        self.config.path = path.to_owned();
        // The device thread takes the two together, under the disk's lock.
        let mut current = crate::bus::lock(&self.disk);
        *current = disk;
        if ring.is_some() {
            *crate::bus::lock(&self.next_ring) = ring;
        }
        Ok(())
    }
}

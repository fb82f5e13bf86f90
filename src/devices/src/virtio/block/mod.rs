//! virtio-blk (virtio 1.2, 5.2) backed by a host file: read, write, flush, GET_ID, DISCARD and
//! WRITE_ZEROES, read-only enforcement, seg_max/size_max, one request queue.

pub mod disk;
pub mod persist;
pub mod request;
#[cfg(test)]
mod tests;

use super::worker::{QueueHandler, Worker};
use super::{features, ActivateContext, ActivateError, GuestMemoryMmap, VirtioDevice};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use disk::Disk;
use request::{Limits, Request, ID_BYTES};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

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
}

fn feature(bit: u32) -> u64 {
    1 << bit
}

/// A drive image: a regular file or a block device, opened without blocking; I/O on it is
/// positioned (pread/pwrite), which O_NONBLOCK does not affect for these kinds of file.
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
        Ok(Self {
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
        }
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
}

impl QueueHandler for Handler {
    fn handle(
        &mut self,
        _queue: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<u32> {
        use crate::metrics::add;
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
                return Some(match status {
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
            return None;
        }
        add(&self.metrics.requests, 1);
        let (status, len) = request.execute(
            &mut crate::bus::lock(&self.disk),
            mem,
            self.read_only,
            &self.id,
            &self.limits,
        );
        if status != VIRTIO_BLK_S_OK as u8 {
            add(&self.metrics.errors, 1);
        } else {
            match request.kind() {
                VIRTIO_BLK_T_IN => add(&self.metrics.read_bytes, u64::from(len - 1)),
                VIRTIO_BLK_T_OUT => add(&self.metrics.write_bytes, request.data_len()),
                VIRTIO_BLK_T_FLUSH => add(&self.metrics.flushes, 1),
                _ => {}
            }
        }
        if mem.write_obj(status, request.status_addr()).is_err() {
            return Some(0);
        }
        Some(len)
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
        let handler = self.handler();
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
        self.config_space = Self::config_image(disk.sectors());
        self.config.path = path.to_owned();
        *crate::bus::lock(&self.disk) = disk;
        Ok(())
    }
}

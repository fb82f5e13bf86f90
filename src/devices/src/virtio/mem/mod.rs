//! virtio-mem (virtio 1.2, 5.15): a region of guest physical memory the driver plugs and
//! unplugs in blocks, towards a size the host requests.
//!
//! The device keeps which blocks are plugged and answers the driver's requests; what plugging
//! and unplugging mean for the host (making a range guest RAM, releasing it) is the
//! [`Backend`]'s, which the VMM provides (`vmm::hotplug`).

pub mod persist;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// virtio device ID of a memory device.
pub const VIRTIO_ID_MEM: u32 = 24;

/// Feature bits (virtio 1.2, 5.15.3).
pub mod feature {
    /// The driver may not read unplugged memory (it is not backed).
    pub const UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
}

/// Request types (virtio 1.2, 5.15.6).
pub mod request {
    /// Plug blocks.
    pub const PLUG: u16 = 0;
    /// Unplug blocks.
    pub const UNPLUG: u16 = 1;
    /// Unplug every block.
    pub const UNPLUG_ALL: u16 = 2;
    /// Ask whether blocks are plugged.
    pub const STATE: u16 = 3;
}

/// Response types.
pub mod response {
    /// Done.
    pub const ACK: u16 = 0;
    /// Refused for now (plugging beyond the requested size).
    pub const NACK: u16 = 1;
    /// Refused for now; try again later.
    pub const BUSY: u16 = 2;
    /// A malformed request.
    pub const ERROR: u16 = 3;
}

/// Block states in a STATE response.
pub mod state {
    /// Every block in the range is plugged.
    pub const PLUGGED: u16 = 0;
    /// No block in the range is plugged.
    pub const UNPLUGGED: u16 = 1;
    /// Some are, some are not.
    pub const MIXED: u16 = 2;
}

/// Bytes of a request: type, 6 bytes padding, address, block count, 6 bytes padding.
pub const REQUEST_SIZE: usize = 24;
/// Bytes of a response: type, 6 bytes padding, state.
pub const RESPONSE_SIZE: usize = 10;

/// Where the device's region lies and how it is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemLayout {
    /// Guest physical address of the region.
    pub addr: u64,
    /// Its size in bytes.
    pub region_size: u64,
    /// What the driver plugs and unplugs at a time.
    pub block_size: u64,
    /// What the host makes guest RAM at a time (a multiple of the block size).
    pub slot_size: u64,
}

impl MemLayout {
    /// Checks the sizes: powers of two from 2 MiB for blocks, slots a multiple of blocks, the
    /// region a multiple of slots and aligned to one.
    pub fn check(&self) -> Result<(), String> {
        let mib = |v: u64| v >> 20;
        if !self.block_size.is_power_of_two() || self.block_size < (2 << 20) {
            return Err(format!(
                "memory hotplug: the block size ({} MiB) must be a power of two of at least 2 MiB",
                mib(self.block_size)
            ));
        }
        if self.slot_size == 0 || !self.slot_size.is_multiple_of(self.block_size) {
            return Err(format!(
                "memory hotplug: the slot size ({} MiB) must be a multiple of the block size ({} MiB)",
                mib(self.slot_size),
                mib(self.block_size)
            ));
        }
        if self.region_size == 0 || !self.region_size.is_multiple_of(self.slot_size) {
            return Err(format!(
                "memory hotplug: the total size ({} MiB) must be a multiple of the slot size ({} MiB)",
                mib(self.region_size),
                mib(self.slot_size)
            ));
        }
        if !self.addr.is_multiple_of(self.slot_size) {
            return Err(format!(
                "memory hotplug: the region at {:#x} is not aligned to its slot size",
                self.addr
            ));
        }
        Ok(())
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.region_size / self.block_size
    }
}

/// What plugging and unplugging do on the host, for a range given as an offset into the
/// region: the VMM makes it guest RAM (a KVM memory slot) or releases it.
pub trait Backend: Send + 'static {
    /// The range becomes usable guest RAM.
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), String>;
    /// The range is given back; its contents are gone.
    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), String>;
}

/// Which blocks are plugged, and the size the host asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    layout: MemLayout,
    plugged: Vec<u64>,
    plugged_blocks: u64,
    requested_size: u64,
}

impl BlockState {
    /// Nothing plugged, nothing requested.
    pub fn new(layout: MemLayout) -> Self {
        Self {
            layout,
            plugged: vec![0; layout.blocks().div_ceil(64) as usize],
            plugged_blocks: 0,
            requested_size: 0,
        }
    }

    fn is_plugged(&self, block: u64) -> bool {
        self.plugged[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: u64, on: bool) {
        let word = &mut self.plugged[(block / 64) as usize];
        if on {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    /// Bytes plugged.
    pub fn plugged_size(&self) -> u64 {
        self.plugged_blocks * self.layout.block_size
    }

    /// Bytes the host asks for.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// Sets the size the host asks for (a multiple of the block size, at most the region).
    pub fn set_requested_size(&mut self, size: u64) -> Result<(), String> {
        if !size.is_multiple_of(self.layout.block_size) || size > self.layout.region_size {
            return Err(format!(
                "memory hotplug: {} MiB cannot be requested: a multiple of the block size ({} MiB) up to {} MiB",
                size >> 20,
                self.layout.block_size >> 20,
                self.layout.region_size >> 20
            ));
        }
        self.requested_size = size;
        Ok(())
    }

    /// The blocks a request names, if they lie in the region.
    fn range(&self, addr: u64, nb_blocks: u16) -> Option<std::ops::Range<u64>> {
        let l = &self.layout;
        let offset = addr.checked_sub(l.addr)?;
        if nb_blocks == 0 || !offset.is_multiple_of(l.block_size) {
            return None;
        }
        let first = offset / l.block_size;
        let end = first.checked_add(u64::from(nb_blocks))?;
        (end <= l.blocks()).then_some(first..end)
    }

    /// Serves one request; returns the response type and, for STATE, the state.
    pub fn handle(&mut self, req: &Request, backend: &mut dyn Backend) -> (u16, u16) {
        let block = self.layout.block_size;
        match req.kind {
            request::PLUG | request::UNPLUG | request::STATE => {
                let Some(range) = self.range(req.addr, req.nb_blocks) else {
                    return (response::ERROR, 0);
                };
                let plugged = range.clone().filter(|&b| self.is_plugged(b)).count() as u64;
                let n = range.end - range.start;
                let (offset, len) = (range.start * block, n * block);
                match req.kind {
                    request::STATE => {
                        let s = match plugged {
                            0 => state::UNPLUGGED,
                            p if p == n => state::PLUGGED,
                            _ => state::MIXED,
                        };
                        (response::ACK, s)
                    }
                    request::PLUG => {
                        if plugged != 0 {
                            return (response::ERROR, 0);
                        }
                        if (self.plugged_blocks + n) * block > self.requested_size {
                            return (response::NACK, 0);
                        }
                        if let Err(e) = backend.plug(offset, len) {
                            utils::warn_limited!(
                                "virtio_mem_plug",
                                "virtio-mem: cannot plug {len:#x} bytes at offset {offset:#x}: {e}"
                            );
                            return (response::ERROR, 0);
                        }
                        range.for_each(|b| self.set(b, true));
                        self.plugged_blocks += n;
                        (response::ACK, 0)
                    }
                    _ => {
                        if plugged != n {
                            return (response::ERROR, 0);
                        }
                        if let Err(e) = backend.unplug(offset, len) {
                            utils::warn_limited!(
                                "virtio_mem_unplug",
                                "virtio-mem: cannot unplug {len:#x} bytes at offset {offset:#x}: {e}"
                            );
                            return (response::ERROR, 0);
                        }
                        range.for_each(|b| self.set(b, false));
                        self.plugged_blocks -= n;
                        (response::ACK, 0)
                    }
                }
            }
            request::UNPLUG_ALL => {
                // Runs of plugged blocks go back one range at a time.
                let mut b = 0;
                while b < self.layout.blocks() {
                    if !self.is_plugged(b) {
                        b += 1;
                        continue;
                    }
                    let start = b;
                    while b < self.layout.blocks() && self.is_plugged(b) {
                        b += 1;
                    }
                    if let Err(e) = backend.unplug(start * block, (b - start) * block) {
                        utils::warn_limited!(
                            "virtio_mem_unplug",
                            "virtio-mem: cannot unplug blocks {start}..{b}: {e}"
                        );
                        return (response::ERROR, 0);
                    }
                    (start..b).for_each(|x| self.set(x, false));
                    self.plugged_blocks -= b - start;
                }
                (response::ACK, 0)
            }
            _ => (response::ERROR, 0),
        }
    }

    /// Runs of plugged blocks as (offset into the region, length), in order.
    pub fn plugged_ranges(&self) -> Vec<(u64, u64)> {
        let (blocks, size) = (self.layout.blocks(), self.layout.block_size);
        let mut out = Vec::new();
        let mut b = 0;
        while b < blocks {
            if !self.is_plugged(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < blocks && self.is_plugged(b) {
                b += 1;
            }
            out.push((start * size, (b - start) * size));
        }
        out
    }

    /// The config space image (virtio 1.2, 5.15.4).
    pub fn config_image(&self) -> [u8; 56] {
        let l = &self.layout;
        let mut c = [0u8; 56];
        c[0..8].copy_from_slice(&l.block_size.to_le_bytes());
        // node_id 0 and padding.
        c[16..24].copy_from_slice(&l.addr.to_le_bytes());
        c[24..32].copy_from_slice(&l.region_size.to_le_bytes());
        c[32..40].copy_from_slice(&l.region_size.to_le_bytes());
        c[40..48].copy_from_slice(&self.plugged_size().to_le_bytes());
        c[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        c
    }
}

/// A driver's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// [`request`] type.
    pub kind: u16,
    /// Guest physical address of the first block.
    pub addr: u64,
    /// How many blocks.
    pub nb_blocks: u16,
}

impl Request {
    /// Parses the 24 bytes of a request.
    pub fn parse(b: &[u8; REQUEST_SIZE]) -> Self {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[8..16]);
        Self {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        }
    }
}

/// The response bytes for `(type, state)`.
pub fn response_bytes((kind, state): (u16, u16)) -> [u8; RESPONSE_SIZE] {
    let mut r = [0u8; RESPONSE_SIZE];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..10].copy_from_slice(&state.to_le_bytes());
    r
}

/// The block state shared by the device thread and the VMM (which changes the requested size
/// and reads the plugged size).
pub type SharedState = Arc<Mutex<BlockState>>;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 128;

/// The device's counters, in the metrics file under `memory_hotplug`.
#[derive(Debug, Default)]
pub struct MemMetrics {
    /// Requests served.
    pub requests: std::sync::atomic::AtomicU64,
    /// Blocks plugged.
    pub plugged_blocks: std::sync::atomic::AtomicU64,
    /// Blocks unplugged.
    pub unplugged_blocks: std::sync::atomic::AtomicU64,
    /// Requests answered NACK (beyond the requested size).
    pub nacks: std::sync::atomic::AtomicU64,
    /// Requests answered ERROR (malformed, or the host could not do it) and chains without
    /// room for a response.
    pub errors: std::sync::atomic::AtomicU64,
}

impl crate::metrics::Counters for MemMetrics {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("requests", self.requests.load(Relaxed)),
            ("plugged_blocks", self.plugged_blocks.load(Relaxed)),
            ("unplugged_blocks", self.unplugged_blocks.load(Relaxed)),
            ("nacks", self.nacks.load(Relaxed)),
            ("errors", self.errors.load(Relaxed)),
        ]
    }
}

/// The device.
pub struct VirtioMem {
    state: SharedState,
    backend: Arc<Mutex<Box<dyn Backend>>>,
    worker: Option<super::worker::Worker>,
    metrics: Arc<MemMetrics>,
}

impl VirtioMem {
    /// A device over `layout` (checked by the caller) whose host side is `backend`.
    pub fn new(layout: MemLayout, backend: Box<dyn Backend>) -> Self {
        Self {
            state: Arc::new(Mutex::new(BlockState::new(layout))),
            backend: Arc::new(Mutex::new(backend)),
            worker: None,
            metrics: crate::metrics::register_counters("memory_hotplug".into()),
        }
    }

    /// The state the VMM reads and changes.
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }
}

struct Handler {
    state: SharedState,
    backend: Arc<Mutex<Box<dyn Backend>>>,
    metrics: Arc<MemMetrics>,
}

impl super::worker::QueueHandler for Handler {
    fn handle(
        &mut self,
        _queue: usize,
        chain: virtio_queue::DescriptorChain<&super::GuestMemoryMmap>,
        mem: &super::GuestMemoryMmap,
    ) -> super::worker::Served {
        use super::worker::Served;
        use vm_memory::Bytes;
        let mut req = [0u8; REQUEST_SIZE];
        let mut got = None;
        let mut resp_at = None;
        for d in chain {
            if d.is_write_only() {
                if resp_at.is_none() && d.len() as usize >= RESPONSE_SIZE {
                    resp_at = Some(d.addr());
                }
            } else if got.is_none()
                && d.len() as usize >= REQUEST_SIZE
                && mem.read_slice(&mut req, d.addr()).is_ok()
            {
                got = Some(Request::parse(&req));
            }
        }
        let add = |c: &std::sync::atomic::AtomicU64, n: u64| crate::metrics::add(c, n);
        add(&self.metrics.requests, 1);
        let Some(at) = resp_at else {
            add(&self.metrics.errors, 1);
            utils::warn_limited!(
                "virtio_mem_bad_chain",
                "virtio-mem: a request without room for its response"
            );
            return Served::Used(0);
        };
        let answer = match got {
            Some(r) => {
                let mut backend = crate::bus::lock(&self.backend);
                let mut state = crate::bus::lock(&self.state);
                let before = state.plugged_blocks;
                let answer = state.handle(&r, backend.as_mut());
                let after = state.plugged_blocks;
                add(&self.metrics.plugged_blocks, after.saturating_sub(before));
                add(&self.metrics.unplugged_blocks, before.saturating_sub(after));
                answer
            }
            None => (response::ERROR, 0),
        };
        match answer.0 {
            response::NACK => add(&self.metrics.nacks, 1),
            response::ERROR => add(&self.metrics.errors, 1),
            _ => {}
        }
        match mem.write_slice(&response_bytes(answer), at) {
            Ok(()) => Served::Used(RESPONSE_SIZE as u32),
            Err(_) => Served::Used(0),
        }
    }
}

impl super::VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        super::features::COMMON | feature::UNPLUGGED_INACCESSIBLE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_image(&crate::bus::lock(&self.state).config_image(), offset, data);
    }

    fn activate(&mut self, ctx: super::ActivateContext) -> Result<(), super::ActivateError> {
        let handler = Handler {
            state: self.state.clone(),
            backend: self.backend.clone(),
            metrics: self.metrics.clone(),
        };
        self.worker = Some(super::worker::Worker::spawn("virtio-mem", handler, ctx)?);
        Ok(())
    }

    fn worker(&self) -> Option<&super::worker::Worker> {
        self.worker.as_ref()
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(persist::MemState::from(&*crate::bus::lock(&self.state)))
            .unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved: persist::MemState = serde_json::from_value(state.clone())
            .map_err(|e| format!("virtio-mem: bad state: {e}"))?;
        let mut s = crate::bus::lock(&self.state);
        saved.apply(&mut s)?;
        // What was plugged is guest RAM again on the host.
        let mut backend = crate::bus::lock(&self.backend);
        for (offset, len) in s.plugged_ranges() {
            backend
                .plug(offset, len)
                .map_err(|e| format!("virtio-mem: cannot plug saved blocks again: {e}"))?;
        }
        Ok(())
    }
}

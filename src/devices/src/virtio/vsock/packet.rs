//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its operations.

/// Bytes of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type vireo carries.
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset.
    pub const RST: u16 = 3;
    /// Shutdown (with RCV/SEND flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit announcement.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit asked for.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN: the peer will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN: the peer will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed of what it received.
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses a header from its 44 little-endian bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The header's 44 little-endian bytes.
    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            len: 7,
            kind: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 42,
        };
        assert_eq!(Header::parse(&h.bytes()), h);
    }
}

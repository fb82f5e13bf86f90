//! Bringing interfaces up and giving them an address, over rtnetlink (no `ip` needed in the
//! image).

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

/// A static IPv4 configuration for one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The interface (`eth0` unless named).
    pub device: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// The network's prefix length.
    pub prefix: u8,
    /// The default route's gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl Address {
    /// Reads the kernel's `ip=` value
    /// (`CLIENT:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:AUTOCONF`): the static address if it
    /// names one (`dhcp` and the like are left to the kernel), and the hostname field.
    pub fn parse_kernel_ip(value: &str) -> Result<(Option<Self>, Option<String>), String> {
        let fields: Vec<&str> = value.split(':').collect();
        let field = |i: usize| fields.get(i).copied().filter(|f| !f.is_empty());
        let hostname = field(4).map(str::to_string);
        let Some(client) = field(0) else {
            return Ok((None, hostname));
        };
        if fields.len() == 1 && !client.contains('.') {
            // ip=dhcp, ip=on, ip=off...: autoconfiguration by the kernel.
            return Ok((None, None));
        }
        let ip = |s: &str, what: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("ip=: {what} {s} is not an IPv4 address"))
        };
        let address = ip(client, "address")?;
        let gateway = field(2).map(|g| ip(g, "gateway")).transpose()?;
        let prefix = match field(3) {
            Some(mask) => {
                let bits = u32::from(ip(mask, "netmask")?);
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(format!("ip=: netmask {mask} is not a prefix"));
                }
                bits.leading_ones() as u8
            }
            // The kernel's default: the address's class.
            None => match address.octets()[0] {
                0..=127 => 8,
                128..=191 => 16,
                _ => 24,
            },
        };
        let device = field(5).unwrap_or("eth0").to_string();
        Ok((
            Some(Self {
                device,
                address,
                prefix,
                gateway,
            }),
            hostname,
        ))
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const AF_INET: u8 = 2;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;

/// One rtnetlink request: header, fixed part, then attributes.
struct Request(Vec<u8>);

impl Request {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set in send()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        b.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
        b.extend_from_slice(fixed);
        Self(b)
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    /// Sends the request and returns the kernel's answer (0 or an errno).
    fn send(mut self, sock: &OwnedFd) -> std::io::Result<()> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        sendto(
            sock.as_raw_fd(),
            &self.0,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut answer = [0u8; 4096];
        let n = recv(sock.as_raw_fd(), &mut answer, MsgFlags::empty())?;
        if n < 20 || u16::from_ne_bytes([answer[4], answer[5]]) != NLMSG_ERROR {
            return Err(std::io::Error::other("unexpected rtnetlink answer"));
        }
        let errno = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
        match errno {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(-e)),
        }
    }
}

fn rtnetlink() -> std::io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?)
}

fn index(device: &str) -> std::io::Result<u32> {
    Ok(nix::net::if_::if_nametoindex(device)?)
}

/// Sets `device` up.
pub fn link_up(device: &str) -> std::io::Result<()> {
    let sock = rtnetlink()?;
    let mut ifinfo = Vec::with_capacity(16);
    ifinfo.extend_from_slice(&[0, 0, 0, 0]); // family, pad, type
    ifinfo.extend_from_slice(&(index(device)? as i32).to_ne_bytes());
    ifinfo.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
    ifinfo.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
    Request::new(RTM_NEWLINK, 0, &ifinfo).send(&sock)
}

/// Gives the interface its address, sets it up, and routes through the gateway by default.
pub fn configure(a: &Address) -> std::io::Result<()> {
    let sock = rtnetlink()?;
    let index = index(&a.device)?;
    let mut ifaddr = vec![AF_INET, a.prefix, 0, 0];
    ifaddr.extend_from_slice(&index.to_ne_bytes());
    Request::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &ifaddr)
        .attr(IFA_LOCAL, &a.address.octets())
        .attr(IFA_ADDRESS, &a.address.octets())
        .send(&sock)?;
    link_up(&a.device)?;
    if let Some(gw) = a.gateway {
        // family, dst_len, src_len, tos, table, protocol, scope (universe), type; flags
        let mut rt = vec![AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST];
        rt.extend_from_slice(&0u32.to_ne_bytes());
        Request::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &rt)
            .attr(RTA_GATEWAY, &gw.octets())
            .attr(RTA_OIF, &index.to_ne_bytes())
            .send(&sock)?;
    }
    Ok(())
}

//! Connecting from a chosen loopback address: Linux routes all of 127/8 to
//! loopback, so a test can be several clients (127.0.0.2, 127.0.0.3 ...)
//! by binding its socket before it connects, which `std` cannot do.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;

/// A blocking TCP connection to `addr` from `source` (port chosen by the
/// kernel), with `TCP_NODELAY` set and no timeouts.
pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = addr else {
        panic!("connect_from: {addr} is not IPv4");
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, owned by the TcpStream made from it (or
    // closed here on failure); the addresses are valid sockaddr_in values.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let from = sockaddr(source, 0);
        let to = sockaddr(*to.ip(), to.port());
        let bound = libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len);
        let connected =
            bound == 0 && libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len) == 0;
        if !connected {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("connecting from {source} to {addr}: {e}");
        }
        TcpStream::from_raw_fd(fd)
    };
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

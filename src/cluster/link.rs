//! One non-blocking connection to Redis: connect, queue commands, write the
//! queue in one go, read replies into RESP frames. No policy here.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::resp::{self, Decoder, Frame, RespError};

/// Bytes queued for one connection, at most (the caller bounds commands
/// too; this is the last line).
pub const MAX_QUEUED: usize = 16 * 1024 * 1024;

#[derive(Debug)]
pub enum LinkError {
    Io(io::Error),
    Resp(RespError),
    /// Redis answered the set-up (AUTH, SELECT, SUBSCRIBE) with an error.
    Refused(String),
    Closed,
    Overflow,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Resp(e) => write!(f, "bad reply: {e}"),
            LinkError::Refused(e) => write!(f, "refused: {e}"),
            LinkError::Closed => f.write_str("Redis closed the connection"),
            LinkError::Overflow => f.write_str("too much queued for Redis"),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

#[derive(Default)]
pub struct Link {
    socket: Option<TcpStream>,
    connected: bool,
    decoder: Decoder,
    out: Vec<u8>,
    /// Replies to the set-up commands still to come (subscriber only).
    pub setup_replies: usize,
}

impl Link {
    pub fn connect(
        &mut self,
        registry: &Registry,
        token: Token,
        addr: SocketAddr,
    ) -> io::Result<()> {
        self.close(registry);
        let mut socket = TcpStream::connect(addr)?;
        registry.register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)?;
        let _ = socket.set_nodelay(true);
        self.socket = Some(socket);
        Ok(())
    }

    pub fn close(&mut self, registry: &Registry) {
        if let Some(mut socket) = self.socket.take() {
            let _ = registry.deregister(&mut socket);
        }
        self.connected = false;
        self.decoder.reset();
        self.out.clear();
        self.setup_replies = 0;
    }

    pub fn queue(&mut self, args: &[&[u8]]) {
        resp::encode_command(&mut self.out, args);
    }

    /// Readiness: finish connecting, write what waits, read every reply.
    pub fn on_ready(&mut self, frames: &mut Vec<Frame>) -> Result<(), LinkError> {
        self.check_connected()?;
        if !self.connected {
            return Ok(());
        }
        self.flush()?;
        let Some(socket) = &mut self.socket else {
            return Err(LinkError::Closed);
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            match socket.read(&mut buf) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            while let Some(frame) = self.decoder.next_frame().map_err(LinkError::Resp)? {
                frames.push(frame);
            }
        }
        while let Some(frame) = self.decoder.next_frame().map_err(LinkError::Resp)? {
            frames.push(frame);
        }
        Ok(())
    }

    fn check_connected(&mut self) -> Result<(), LinkError> {
        let Some(socket) = &self.socket else {
            return Err(LinkError::Closed);
        };
        if self.connected {
            return Ok(());
        }
        if let Some(e) = socket.take_error()? {
            return Err(e.into());
        }
        match socket.peer_addr() {
            Ok(_) => self.connected = true,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Writes the queue; what the socket does not take waits for writable.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        if self.out.len() > MAX_QUEUED {
            return Err(LinkError::Overflow);
        }
        if !self.connected || self.out.is_empty() {
            return Ok(());
        }
        let Some(socket) = &mut self.socket else {
            return Err(LinkError::Closed);
        };
        let mut written = 0;
        while written < self.out.len() {
            match socket.write(&self.out[written..]) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.out.drain(..written);
        Ok(())
    }
}

//! The WebSocket protocol (RFC 6455) without I/O: frames in, messages out.

pub mod close;
pub mod frame;
pub mod message;
pub mod utf8;

pub use close::CloseCode;
pub use frame::Opcode;
pub use message::{CloseFrame, Decoder, Message, ProtocolError};

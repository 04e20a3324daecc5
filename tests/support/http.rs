//! Plain HTTP requests to the server under test (`/healthz`, `/metrics`),
//! one fresh connection each, and reading figures out of `/metrics`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The whole answer to `GET path` (the server closes after it).
pub fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect for {path}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap_or_else(|e| panic!("request {path}: {e}"));
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    text
}

/// The value of the first line of `/metrics` text that starts with
/// `name` (with its labels, if given) followed by a space.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

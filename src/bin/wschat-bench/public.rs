//! Public messages from one publisher connection on the open-loop schedule
//! ([`Window::due`]), and the check of one received: `fanout` measures them,
//! `private --public-rate` floods its pairs with them.

use crate::hist::Histogram;
use crate::net::Net;
use crate::phases::Window;
use crate::scan::{field, parse_body, push_body};

pub struct Publisher {
    /// The publisher's username: every copy must come `from` it.
    pub name: String,
    /// Its connection, once open.
    pub id: usize,
    size: usize,
    interval: f64,
    /// Per message `K<seq>`: its scheduled send time (also in its body).
    pub sent_at: Vec<u64>,
    /// How late each message of the measured part went out.
    pub lag: Histogram,
    /// Copies received not from the publisher, or not of a message it sent.
    pub misrouted: u64,
    /// Copies received whose body is not of the shape `K<seq>T<ns>X…`.
    pub malformed: u64,
    msg: Vec<u8>,
}

impl Publisher {
    /// `rate` messages per second with bodies of `size` bytes; set `id` once
    /// the connection is open.
    pub fn new(name: String, rate: f64, size: usize) -> Publisher {
        Publisher {
            name,
            id: usize::MAX,
            size,
            interval: 1e9 / rate,
            sent_at: Vec::new(),
            lag: Histogram::new(),
            misrouted: 0,
            malformed: 0,
            msg: Vec::with_capacity(size + 64),
        }
    }

    /// Sends every message that is due (each at its scheduled time).
    pub fn publish_due(&mut self, w: &Window, net: &mut Net) {
        while let Some(at) = w.due(self.sent_at.len() as u64, self.interval, net, &mut self.lag) {
            let k = self.sent_at.len() as u64;
            let msg = &mut self.msg;
            msg.clear();
            msg.extend_from_slice(br#"{"type":"public","body":""#);
            push_body(msg, &[(b'K', k), (b'T', at)], self.size);
            msg.extend_from_slice(br#""}"#);
            self.sent_at.push(at);
            net.send_text(self.id, msg);
        }
    }

    /// Checks a received message of type `public` against what was
    /// published: its number and scheduled time if it is one of ours; if not,
    /// it is counted as misrouted or malformed.
    pub fn check(&mut self, text: &[u8]) -> Option<(usize, u64)> {
        let fields = field(text, "body").and_then(|b| parse_body(b, [b'K', b'T']));
        let Some([seq, ts]) = fields else {
            self.malformed += 1;
            return None;
        };
        let seq = seq as usize;
        if field(text, "from") != Some(self.name.as_bytes()) || self.sent_at.get(seq) != Some(&ts) {
            self.misrouted += 1;
            return None;
        }
        Some((seq, ts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_copies_are_checked_against_what_was_sent() {
        let mut p = Publisher::new("abcpub".into(), 100.0, 32);
        p.sent_at = vec![10, 20];
        let copy = |from: &str, body: &str| {
            format!(r#"{{"type":"public","id":3,"from":"{from}","body":"{body}"}}"#)
        };
        assert_eq!(
            p.check(copy("abcpub", "K1T20Xxxxx").as_bytes()),
            Some((1, 20))
        );
        for wrong in [
            copy("abcpubx", "K1T20X"),
            copy("abcpub", "K1T21X"),
            copy("abcpub", "K2T30X"),
        ] {
            assert_eq!(p.check(wrong.as_bytes()), None, "{wrong}");
        }
        for bad in [copy("abcpub", "K1X"), copy("abcpub", "hello")] {
            assert_eq!(p.check(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!((p.misrouted, p.malformed), (3, 2));
    }
}

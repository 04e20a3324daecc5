//! Delivery under pressure, through real sockets against the real binary:
//! bursts far above the soft mark reach a reader that reads, a flood of
//! private messages cannot knock a steady reader off, a non-reader is still
//! disconnected after a gap-free prefix, and a private message overtakes
//! public traffic queued for the same reader.

mod chat_support;
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use chat_support::{
    client_frame, Chat, ChatServer, Raw, RawRead, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,
};
use serde_json::{json, Value};
use support::http;

/// One masked text frame, as a client sends it.
fn text_frame(text: &str) -> Vec<u8> {
    client_frame(OP_TEXT, text.as_bytes())
}

/// A body that carries its index: `000042:xxxx…` of `len` bytes.
fn body(i: usize, len: usize) -> String {
    format!("{i:06}:{}", "x".repeat(len - 7))
}

fn index_of(v: &Value) -> usize {
    let body = v["body"].as_str().expect("a body");
    body[..6].parse().expect("an indexed body")
}

/// What a reader thread saw: every JSON message, and how the connection ended.
struct Seen {
    messages: Vec<Value>,
    close: Option<u16>,
}

/// Reads `raw` on a thread until `stop` says when: `stop(messages)` true,
/// or the connection ends. Pings are not answered (the test ends first).
fn read_until(
    raw: Raw,
    stop: impl Fn(&[Value]) -> bool + Send + 'static,
) -> thread::JoinHandle<Seen> {
    read_paced(raw, usize::MAX, stop)
}

/// [`read_until`] for a reader that takes about `bytes_per_ms` and no more:
/// a steady client, slower than the server.
fn read_paced(
    mut raw: Raw,
    bytes_per_ms: usize,
    stop: impl Fn(&[Value]) -> bool + Send + 'static,
) -> thread::JoinHandle<Seen> {
    thread::spawn(move || {
        let mut since_pause = 0;
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let mut messages = Vec::new();
        loop {
            if stop(&messages) {
                return Seen {
                    messages,
                    close: None,
                };
            }
            match raw.read("reader") {
                RawRead::Closed => {
                    return Seen {
                        messages,
                        close: None,
                    }
                }
                RawRead::Frame(frame) => match frame.opcode {
                    OP_TEXT => {
                        since_pause += frame.payload.len();
                        if since_pause >= bytes_per_ms {
                            let ms = since_pause / bytes_per_ms;
                            since_pause -= ms * bytes_per_ms;
                            thread::sleep(Duration::from_millis(ms as u64));
                        }
                        messages.push(frame.json());
                    }
                    OP_PING | OP_PONG => {}
                    OP_CLOSE => {
                        return Seen {
                            messages,
                            close: frame.close_code(),
                        }
                    }
                    other => panic!("reader: unexpected opcode {other:#x}"),
                },
            }
        }
    })
}

fn publics(messages: &[Value]) -> Vec<usize> {
    messages
        .iter()
        .filter(|v| v["type"] == "public")
        .map(index_of)
        .collect()
}

fn gaps(messages: &[Value]) -> Vec<&Value> {
    messages.iter().filter(|v| v["type"] == "gap").collect()
}

#[test]
fn a_reader_that_reads_gets_every_public_of_bursts_far_above_the_soft_mark() {
    // Soft mark 16 KiB; each burst is 50 × 4 KiB, written at once.
    let server = ChatServer::start(&["--max-outbound", "65536", "--rate-limit", "0"]);
    let bursts = 8;
    let per_burst = 50;
    let total = bursts * per_burst;
    let reader = read_until(Raw::join(server.addr, "reader"), move |m| {
        publics(m).len() >= total || !gaps(m).is_empty()
    });
    let mut sender = Raw::join(server.addr, "sender");
    let sender_reads = read_until(
        Raw {
            stream: sender.stream.try_clone().expect("clone"),
        },
        move |m| publics(m).len() >= total || !gaps(m).is_empty(),
    );
    for b in 0..bursts {
        let burst: Vec<u8> = (0..per_burst)
            .flat_map(|i| {
                text_frame(
                    &json!({"type":"public","body":body(b * per_burst + i, 4000)}).to_string(),
                )
            })
            .collect();
        sender.stream.write_all(&burst).expect("write a burst");
    }
    for (who, seen) in [("reader", reader.join()), ("sender", sender_reads.join())] {
        let seen = seen.expect("reader thread");
        assert_eq!(gaps(&seen.messages), Vec::<&Value>::new(), "{who} was shed");
        assert_eq!(
            publics(&seen.messages),
            (0..total).collect::<Vec<_>>(),
            "{who} gets every public message, in order"
        );
    }
}

#[test]
fn ten_senders_of_64_kib_messages_in_one_turn_do_not_shed_a_reader_that_reads() {
    // The default --max-outbound (soft mark 256 KiB); 10 senders each write
    // four ~60 KB messages at once, released together.
    let server = ChatServer::start(&["--max-body", "61000"]);
    let senders = 10;
    let each = 4;
    let total = senders * each;
    let reader = read_until(Raw::join(server.addr, "reader"), move |m| {
        publics(m).len() >= total || !gaps(m).is_empty()
    });
    let mut clients: Vec<Raw> = (0..senders)
        .map(|s| Raw::join(server.addr, &format!("s{s}")))
        .collect();
    // Each sender's own copies: read (and dropped) so no sender is shed itself.
    let drains: Vec<_> = clients
        .iter()
        .map(|c| {
            let raw = Raw {
                stream: c.stream.try_clone().expect("clone"),
            };
            read_until(raw, move |m| {
                publics(m).len() >= total || !gaps(m).is_empty()
            })
        })
        .collect();
    let bursts: Vec<Vec<u8>> = (0..senders)
        .map(|s| {
            (0..each)
                .flat_map(|i| {
                    let text = json!({"type":"public","body":body(s * each + i, 60_000)});
                    text_frame(&text.to_string())
                })
                .collect()
        })
        .collect();
    let go = Arc::new(Barrier::new(senders));
    let writers: Vec<_> = clients
        .iter_mut()
        .zip(bursts)
        .map(|(c, burst)| {
            let mut stream: TcpStream = c.stream.try_clone().expect("clone");
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                stream.write_all(&burst).expect("write a burst");
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let seen = reader.join().expect("reader thread");
    assert_eq!(
        gaps(&seen.messages),
        Vec::<&Value>::new(),
        "the reader was shed"
    );
    let mut got = publics(&seen.messages);
    assert_eq!(got.len(), total, "every public message");
    got.sort_unstable();
    assert_eq!(got, (0..total).collect::<Vec<_>>());
    for d in drains {
        let seen = d.join().expect("a sender's reader");
        assert_eq!(
            gaps(&seen.messages),
            Vec::<&Value>::new(),
            "a sender was shed"
        );
    }
}

/// Sends privates from `sender` to `to` one at a time, each waiting for its
/// answer; returns the answers (receipts and errors).
fn private_answers(sender: &mut Chat, to: &str, count: usize, len: usize) -> Vec<Value> {
    (0..count)
        .map(|k| {
            sender.send(json!({"type":"private","to":to,"body":body(k, len),"ref":k}));
            loop {
                let v = sender.recv("answer to a private");
                if v["type"] == "receipt" || v["type"] == "error" {
                    return v;
                }
            }
        })
        .collect()
}

/// The next private message, skipping presence.
fn recv_private(chat: &mut Chat, context: &str) -> Value {
    loop {
        let v = chat.recv(context);
        if v["type"] != "join" && v["type"] != "leave" {
            assert_eq!(v["type"], "private", "{context}: {v}");
            return v;
        }
    }
}

#[test]
fn a_private_flood_cannot_knock_a_steady_reader_off_and_the_flooder_pays() {
    let server = ChatServer::start(&[
        "--max-outbound",
        "262144",
        "--max-body",
        "9000",
        "--rate-limit",
        "0",
    ]);
    // 8 KB each: 8 MB, more than the socket buffers hold (Linux lets a
    // socket's send buffer grow to tcp_wmem's 4 MiB).
    let flood = 1000;
    // The victim reads steadily (about 4 MB/s, slower than the flood, with
    // a small receive buffer, as a phone might) until the friend's message
    // arrives.
    let victim = Raw::join(server.addr, "victim");
    set_receive_buffer(&victim.stream, 64 * 1024);
    let victim = read_paced(victim, 4 * 1024, |m| {
        m.iter().any(|v| v["from"] == "friend")
    });
    let mut bystander = Chat::joined(server.addr, "bystander");
    let mut friend = Chat::joined(server.addr, "friend");
    bystander.recv_type("join", "friend");

    // The flooder writes as fast as the server reads it, and reads its
    // answers on another thread.
    let mut flooder = Raw::join(server.addr, "flooder");
    let answers = read_until(
        Raw {
            stream: flooder.stream.try_clone().expect("clone"),
        },
        move |m| {
            m.iter()
                .filter(|v| v["type"] == "receipt" || v["type"] == "error")
                .count()
                >= flood
        },
    );
    // Built beforehand, so the flood leaves as fast as the server reads it.
    let bytes: Vec<u8> = (0..flood)
        .flat_map(|k| {
            let text = json!({"type":"private","to":"victim","body":body(k, 8000),"ref":k});
            text_frame(&text.to_string())
        })
        .collect();
    let writer = thread::spawn(move || {
        flooder.stream.write_all(&bytes).expect("flood");
        flooder
    });
    // Meanwhile a bystander and a friend chat.
    for k in 0..20 {
        let answers = private_answers(&mut bystander, "friend", 1, 100);
        assert_eq!(answers[0]["status"], "delivered", "{}", answers[0]);
        let v = recv_private(&mut friend, "the bystander's message");
        assert_eq!(v["from"], "bystander", "message {k}");
    }
    let _flooder = writer.join().expect("writer");
    let answers = answers.join().expect("answers").messages;
    let delivered: Vec<usize> = answers
        .iter()
        .filter(|v| v["status"] == "delivered")
        .map(|v| v["ref"].as_u64().expect("ref") as usize)
        .collect();
    let busy = answers
        .iter()
        .filter(|v| v["code"] == "recipient_busy")
        .count();
    let held = answers.iter().filter(|v| v["status"] == "queued").count();
    assert_eq!(
        held, 0,
        "the victim was disconnected: {held} privates held for later"
    );
    assert_eq!(delivered.len() + busy, flood, "every private answered");

    // The victim is still connected and gets every delivered message, in
    // order, then the friend's, queued after them.
    let answers = private_answers(&mut friend, "victim", 1, 10);
    assert_eq!(answers[0]["status"], "delivered", "{}", answers[0]);
    let seen = victim.join().expect("victim thread");
    assert_eq!(seen.close, None, "the victim was disconnected");
    let got: Vec<usize> = seen
        .messages
        .iter()
        .filter(|v| v["from"] == "flooder")
        .map(index_of)
        .collect();
    assert_eq!(got, delivered, "delivered means received, in order");
    // The flood's cost fell on the flooder: it was held (not read) while the
    // victim drained.
    let metrics = http::get(server.addr, "/metrics");
    let held = http::metric_value(&metrics, "wschat_senders_held_total")
        .unwrap_or_else(|| panic!("no wschat_senders_held_total in {metrics}"));
    assert!(
        held > 0.0,
        "the flooder was never held ({} delivered, {busy} refused): {metrics}",
        delivered.len()
    );
}

fn set_receive_buffer(stream: &TcpStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor and a c_int option of its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

#[test]
fn a_reader_that_does_not_read_is_disconnected_after_a_gap_free_prefix() {
    let server = ChatServer::start(&[
        "--max-outbound",
        "65536",
        "--max-body",
        "9000",
        "--slow-reader-after",
        "300ms",
        "--rate-limit",
        "0",
    ]);
    let mut sender = Chat::joined(server.addr, "sender");
    let sleeper = Raw::join(server.addr, "sleeper");
    sender.recv_type("join", "sleeper");
    // Privates until one is held for later (the sleeper was disconnected);
    // `recipient_busy` while it is within its grace, then the same again.
    let mut delivered = Vec::new();
    let mut k = 0;
    let queued = loop {
        assert!(k < 100_000, "the sleeper was never disconnected");
        sender.send(json!({"type":"private","to":"sleeper","body":body(k, 8000),"ref":k}));
        let v = loop {
            let v = sender.recv("answer");
            if v["type"] != "leave" && v["type"] != "join" {
                break v;
            }
        };
        match (v["status"].as_str(), v["code"].as_str()) {
            (Some("delivered"), _) => {
                delivered.push(k);
                k += 1;
            }
            (_, Some("recipient_busy")) => {}
            (Some("queued"), _) => break k,
            _ => panic!("unexpected answer {v}"),
        }
    };
    // Now it reads: a prefix without holes, exactly what was delivered, then 1008.
    let seen = read_until(sleeper, |_| false).join().expect("sleeper");
    let got: Vec<usize> = seen
        .messages
        .iter()
        .filter(|v| v["type"] == "private")
        .map(index_of)
        .collect();
    assert_eq!(got, delivered, "a gap-free prefix");
    assert_eq!(seen.close, Some(1008), "closed as a slow consumer");
    // The message that found it gone is held for its next visit.
    let (mut back, _) = Chat::join(server.addr, "sleeper");
    let held = back.recv_type("private", "held private");
    assert_eq!(index_of(&held), queued);
    assert_eq!(held["offline"], true);
}

#[test]
fn a_private_overtakes_public_traffic_queued_for_the_same_reader() {
    // The default --max-outbound: up to 256 KiB of public traffic may wait
    // in the server for a reader whose socket is full.
    let server = ChatServer::start(&["--max-body", "9000", "--rate-limit", "0"]);
    let reader = Raw::join(server.addr, "reader");
    let mut friend = Chat::joined(server.addr, "friend");
    let mut publisher = Raw::join(server.addr, "publisher");
    // The reader does not read: the flood fills its socket and the server's
    // queue. A private to the friend follows it in the same write, so when
    // the friend has it, the whole flood was routed.
    let count = 4000; // 8 KB each: 32 MB, beyond any loopback socket buffers
    let mut flood: Vec<u8> = (0..count)
        .flat_map(|i| text_frame(&json!({"type":"public","body":body(i, 8000)}).to_string()))
        .collect();
    flood.extend(text_frame(
        &json!({"type":"private","to":"friend","body":"flood sent"}).to_string(),
    ));
    publisher.stream.write_all(&flood).expect("flood");
    loop {
        let v = friend.recv("the flood as the friend sees it");
        if v["type"] == "private" {
            assert_eq!(v["body"], "flood sent");
            break;
        }
    }
    friend.send(json!({"type":"private","to":"reader","body":"urgent"}));
    loop {
        let v = friend.recv("the receipt");
        if v["type"] == "receipt" {
            assert_eq!(v["status"], "delivered", "{v}");
            break;
        }
    }
    // Now the reader reads what is left for it, up to its gap.
    let seen = read_until(reader, |m| m.iter().any(|v| v["type"] == "gap"))
        .join()
        .expect("reader");
    let private_at = seen
        .messages
        .iter()
        .position(|v| v["type"] == "private")
        .expect("the private arrives");
    let publics_after = seen.messages[private_at..]
        .iter()
        .filter(|v| v["type"] == "public")
        .count();
    assert!(
        publics_after > 0,
        "the private waited behind every public queued before it"
    );
    // The publics it did get are in order.
    let got = publics(&seen.messages);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "publics in order");
}

#[test]
fn a_reconnecting_user_gets_all_its_stored_messages_however_many_fit_the_store() {
    // 30 × 8 KB held: past twice --max-outbound, all replayed at the welcome.
    let server = ChatServer::start(&["--max-outbound", "65536", "--max-body", "9000"]);
    let mut sender = Chat::joined(server.addr, "sender");
    // away was here once (only users get offline messages), and left.
    Chat::joined(server.addr, "away").close();
    sender.recv_type("join", "away joins");
    sender.recv_type("leave", "away leaves");
    for k in 0..30 {
        sender.send(json!({"type":"private","to":"away","body":body(k, 8000)}));
        assert_eq!(sender.recv_type("receipt", "queued")["status"], "queued");
    }
    let (mut away, _) = Chat::join(server.addr, "away");
    for k in 0..30 {
        let v = away.recv_type("private", "a stored message");
        assert_eq!((index_of(&v), &v["offline"]), (k, &json!(true)));
    }
}

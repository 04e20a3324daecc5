//! Echo behaviour with a real WebSocket client (tungstenite).

mod common;
mod support;

use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::{Bytes, Message};

use common::*;

fn expect_text_msg(ws: &mut Client, want: &str, context: &str) {
    match read_data(ws, context) {
        Message::Text(t) => assert!(
            t.as_str() == want,
            "{context}: text differs (got {} bytes, want {} bytes)",
            t.len(),
            want.len()
        ),
        other => panic!("{context}: expected text, got {other:?}"),
    }
}

fn expect_binary_msg(ws: &mut Client, want: &[u8], context: &str) {
    match read_data(ws, context) {
        Message::Binary(b) => assert!(
            b.as_ref() == want,
            "{context}: binary differs (got {} bytes, want {} bytes)",
            b.len(),
            want.len()
        ),
        other => panic!("{context}: expected binary, got {other:?}"),
    }
}

#[test]
fn text_echo() {
    let mut server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");
    for text in [
        "hello",
        "",
        "with spaces and\nnewlines\r\n",
        "{\"json\": true}",
    ] {
        ws.send(Message::text(text)).expect("send text");
        expect_text_msg(&mut ws, text, "text echo");
    }
    close_client(ws);
    server.assert_serving();
}

#[test]
fn binary_echo() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    for data in [vec![], vec![0u8], all_bytes, vec![0xffu8; 1000]] {
        ws.send(Message::binary(data.clone())).expect("send binary");
        expect_binary_msg(&mut ws, &data, "binary echo");
    }
    close_client(ws);
}

#[test]
fn unicode_text_echo() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws?username=%E2%9C%93");
    for text in [
        "héllo wörld",
        "日本語のテキスト",
        "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦",
        "combining e\u{301} and zero\u{200b}width",
        "\u{10ffff}\u{fffd}\u{feff}",
        "Ελληνικά Русский עברית العربية",
    ] {
        ws.send(Message::text(text)).expect("send unicode text");
        expect_text_msg(&mut ws, text, text);
    }
    close_client(ws);
}

#[test]
fn messages_keep_their_order() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");
    for i in 0..200 {
        if i % 2 == 0 {
            ws.write(Message::text(format!("msg {i}")))
                .expect("queue text");
        } else {
            ws.write(Message::binary(format!("bin {i}").into_bytes()))
                .expect("queue binary");
        }
    }
    ws.flush().expect("flush queued messages");
    for i in 0..200 {
        if i % 2 == 0 {
            expect_text_msg(&mut ws, &format!("msg {i}"), "ordered text");
        } else {
            expect_binary_msg(&mut ws, format!("bin {i}").as_bytes(), "ordered binary");
        }
    }
    close_client(ws);
}

#[test]
fn large_messages_near_the_default_limit() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");
    let bin: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(bin.clone()))
        .expect("send 64 KiB binary");
    expect_binary_msg(&mut ws, &bin, "64 KiB binary");

    // Multi-byte text exactly at 65536 bytes: 16384 four-byte characters.
    let text = "😀".repeat(16384);
    assert_eq!(text.len(), 65536);
    ws.send(Message::text(text.clone()))
        .expect("send 64 KiB text");
    expect_text_msg(&mut ws, &text, "64 KiB text");

    let text = "x".repeat(65535);
    ws.send(Message::text(text.clone()))
        .expect("send 64 KiB - 1 text");
    expect_text_msg(&mut ws, &text, "64 KiB - 1 text");
    close_client(ws);
}

#[test]
fn message_over_the_limit_gets_1009() {
    let mut server = Server::echo(&["--max-message-size", "1000"]);
    let mut ws = ws_client(server.addr, "/ws");
    ws.send(Message::binary(vec![7u8; 1000]))
        .expect("send 1000 bytes");
    expect_binary_msg(&mut ws, &[7u8; 1000], "message at the limit");
    ws.send(Message::binary(vec![7u8; 1001]))
        .expect("send 1001 bytes");
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Size, "close frame {frame:?}");
                break;
            }
            Ok(Message::Close(None)) => panic!("close without a code, expected 1009"),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(other) => panic!("expected close 1009, got {other:?}"),
            Err(e) => panic!("expected close 1009, got error {e}"),
        }
    }
    // The server closes the TCP connection after its close frame.
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        Err(tungstenite::Error::Io(e)) if is_reset(&e) => {}
        Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
            panic!("server did not close the TCP connection after close 1009")
        }
        other => panic!("expected the connection to end, got {other:?}"),
    }
    server.assert_serving();
}

#[test]
fn fragmented_messages_from_tungstenite() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");

    let send_frame = |ws: &mut Client, data: &[u8], op: OpCode, fin: bool| {
        ws.send(Message::Frame(Frame::message(
            Bytes::copy_from_slice(data),
            op,
            fin,
        )))
        .expect("send raw frame");
    };

    // Text in three fragments, split inside multi-byte characters.
    let text = "Grüße, 世界! 😀";
    let bytes = text.as_bytes();
    send_frame(&mut ws, &bytes[..3], OpCode::Data(Data::Text), false); // "Gr" + half of ü
    send_frame(&mut ws, &bytes[3..14], OpCode::Data(Data::Continue), false);
    send_frame(&mut ws, &bytes[14..], OpCode::Data(Data::Continue), true);
    expect_text_msg(&mut ws, text, "fragmented unicode text");

    // Binary in many small fragments.
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let chunks: Vec<&[u8]> = data.chunks(97).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        send_frame(&mut ws, chunk, op, i + 1 == chunks.len());
    }
    expect_binary_msg(&mut ws, &data, "fragmented binary");

    // Large fragmented message right at the limit (2 x 32 KiB).
    let big = vec![b'z'; 65536];
    send_frame(&mut ws, &big[..32768], OpCode::Data(Data::Text), false);
    send_frame(&mut ws, &big[32768..], OpCode::Data(Data::Continue), true);
    expect_text_msg(
        &mut ws,
        std::str::from_utf8(&big).expect("ascii"),
        "fragmented 64 KiB text",
    );
    close_client(ws);
}

#[test]
fn ping_from_tungstenite_gets_pong() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .expect("send ping");
    match ws.read() {
        Ok(Message::Pong(p)) => assert_eq!(p.as_ref(), b"are you there", "pong payload"),
        Ok(other) => panic!("expected pong, got {other:?}"),
        Err(e) => panic!("expected pong, got error {e}"),
    }
    close_client(ws);
}

#[test]
fn client_close_is_echoed_with_code() {
    let server = Server::echo(&[]);
    let mut ws = ws_client(server.addr, "/ws");
    ws.send(Message::text("before close")).expect("send text");
    expect_text_msg(&mut ws, "before close", "echo before close");
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Away,
        reason: "leaving".into(),
    }))
    .expect("send close");
    match ws.read() {
        Ok(Message::Close(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Away, "echoed close {frame:?}")
        }
        other => panic!("expected the close to be echoed, got {other:?}"),
    }
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        Err(tungstenite::Error::Io(e)) if is_reset(&e) => {}
        other => panic!("expected the connection to end after close, got {other:?}"),
    }
}

#[test]
fn several_clients_each_get_their_own_echo() {
    let mut server = Server::echo(&[]);
    let mut clients: Vec<Client> = (0..10)
        .map(|i| ws_client(server.addr, &format!("/ws?username=user{i}")))
        .collect();
    for round in 0..3 {
        for (i, ws) in clients.iter_mut().enumerate() {
            let text = format!("client {i} round {round}");
            ws.send(Message::text(text.clone())).expect("send");
            // The sender must see its own message echoed (other messages,
            // e.g. chat broadcasts, are skipped).
            let mut seen = Vec::new();
            loop {
                match read_data(ws, "own echo") {
                    Message::Text(t) if t.as_str() == text => break,
                    other => {
                        seen.push(other);
                        assert!(
                            seen.len() < 100,
                            "client {i} never got its own echo; saw {seen:?}"
                        );
                    }
                }
            }
        }
    }
    for ws in clients {
        close_client(ws);
    }
    server.assert_serving();
}

#[test]
fn a_message_larger_than_twice_the_outbound_limit_is_still_echoed() {
    // The echo of one allowed message may exceed --max-outbound on its own:
    // that is not a reader falling behind (Autobahn 9.x sends 4-16 MiB).
    let server = Server::echo(&["--max-message-size", "4194304", "--max-outbound", "1048576"]);
    let mut ws = ws_client(server.addr, "/ws");
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(data.clone())).expect("send 3 MiB");
    expect_binary_msg(&mut ws, &data, "3 MiB echo");
    close_client(ws);
}

//! Usernames through real sockets: a name that looks like an online user's
//! is refused, invisible and mixed-script names are invalid, and a name
//! sent in NFD is the NFC name.

mod chat_support;
mod support;

use chat_support::{ws_path, Chat, ChatServer};

#[test]
fn a_lookalike_of_an_online_user_is_refused_and_the_owner_keeps_the_name() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");

    // (name the second client asks for, the error code, the close code)
    let table = [
        ("Alice", "username_taken", 4009),           // case folded
        ("a1ice", "username_taken", 4009),           // a digit one for l
        ("\u{430}lice", "invalid_username", 4001),   // Cyrillic а among Latin letters
        ("\u{ff41}lice", "invalid_username", 4001),  // full-width a
        ("\u{1d41a}lice", "invalid_username", 4001), // mathematical bold a
        ("alice\u{3164}", "invalid_username", 4001), // HANGUL FILLER, invisible
        ("al\u{200b}ice", "invalid_username", 4001), // zero width space
    ];
    for (name, code, close) in table {
        let mut second = Chat::open(server.addr, &ws_path(name));
        second.label = format!("second client as {name:?}");
        second.recv_error(code, "lookalike name");
        second.expect_close(close, None, "lookalike name");
    }

    // A different name in another script, and an NFD spelling, are fine;
    // the latter is known by its NFC form.
    let (_li, welcome) = Chat::join(server.addr, "李雷");
    assert_eq!(welcome["username"], "李雷", "{welcome}");
    let mut zoe = Chat::open(server.addr, &ws_path("Zoe\u{308}"));
    let welcome = zoe.recv_type("welcome", "NFD name");
    assert_eq!(welcome["username"], "Zo\u{eb}", "{welcome}");
    let users = alice.users("after the refusals");
    assert_eq!(
        users["online"], 3,
        "the refused clients are not online: {users}"
    );
}

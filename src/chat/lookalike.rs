//! Names taken by their look: a name may not be admitted while another
//! user's name looks the same (see [`username::lookalike_keys`]): not while
//! that user is online, nor ever once that user is known (it connected and
//! the offline store remembers it), so that nobody can pass for a user, nor
//! take mail or attention meant for one. The first spelling to connect
//! keeps the name. Checked at join (and on a private message's miss), never
//! for a message to someone online.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::rc::Rc;

use super::username;

/// Whose look a name has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clash {
    /// A user online under another spelling.
    Online,
    /// A known user (offline, perhaps) under another spelling.
    Known,
}

#[derive(Debug, Default)]
pub struct Lookalikes {
    /// The keys of the names online, each to the name that holds it.
    online: HashMap<Box<str>, Rc<str>>,
    /// The keys of known users' names, hashed: 8 bytes a key however long
    /// the name, since `--max-known-users` may be a million. The hasher is
    /// keyed at random at each start (the set is rebuilt from the names),
    /// so nobody can make a name's hash collide with another user's on
    /// purpose; a chance collision (about n/2^64) refuses a name that
    /// merely shares a hash.
    known: HashSet<u64>,
    hasher: RandomState,
}

impl Lookalikes {
    /// The set for the users the offline store knows.
    pub fn new<'a>(known: impl Iterator<Item = &'a str>) -> Lookalikes {
        let mut lookalikes = Lookalikes::default();
        for name in known {
            lookalikes.remember(&username::lookalike_keys(name));
        }
        lookalikes
    }

    /// Whether `name` (valid, with its `keys`) looks like another user's
    /// name. `known_exactly`: `name` itself is a known user, who keeps it.
    pub fn clash(&self, name: &str, keys: &[Box<str>], known_exactly: bool) -> Option<Clash> {
        if keys
            .iter()
            .any(|key| self.online.get(key).is_some_and(|holder| **holder != *name))
        {
            return Some(Clash::Online);
        }
        if !known_exactly && keys.iter().any(|key| self.known.contains(&self.hash(key))) {
            return Some(Clash::Known);
        }
        None
    }

    /// `name` (admitted) is online.
    pub fn arrive(&mut self, name: &Rc<str>, keys: Vec<Box<str>>) {
        for key in keys {
            self.online.insert(key, name.clone());
        }
    }

    /// `name` is no longer online.
    pub fn leave(&mut self, name: &str) {
        for key in username::lookalike_keys(name) {
            if self
                .online
                .get(&key)
                .is_some_and(|holder| **holder == *name)
            {
                self.online.remove(&key);
            }
        }
    }

    /// A user with these keys is known (the offline store remembered it).
    pub fn remember(&mut self, keys: &[Box<str>]) {
        for key in keys {
            self.known.insert(self.hash(key));
        }
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str) -> Vec<Box<str>> {
        username::lookalike_keys(name)
    }

    #[test]
    fn online_and_known_names_keep_their_look() {
        let mut names = Lookalikes::new(["bob"].into_iter());
        let alice: Rc<str> = Rc::from("alice");
        names.arrive(&alice, keys("alice"));
        // (name, it is a known user itself, what it clashes with)
        let table = [
            ("alice", true, None),
            ("\u{430}lice", false, Some(Clash::Online)), // not valid; the keys clash anyway
            ("Alice", false, Some(Clash::Online)),
            ("Alice", true, Some(Clash::Online)), // known too, but alice is online
            ("aIice", false, Some(Clash::Online)),
            ("bob", true, None),
            ("BOB", false, Some(Clash::Known)),
            ("b0b", false, Some(Clash::Known)),
            ("b0b", true, None), // known from before: it keeps its name
            ("carol", false, None),
        ];
        for (name, known, expected) in table {
            assert_eq!(names.clash(name, &keys(name), known), expected, "{name}");
        }
        names.leave("alice");
        assert_eq!(names.clash("Alice", &keys("Alice"), false), None);
        // Leaving does not free a key held by another name.
        let carol: Rc<str> = Rc::from("carol");
        names.arrive(&carol, keys("carol"));
        names.leave("CAROL");
        assert_eq!(
            names.clash("Carol", &keys("Carol"), false),
            Some(Clash::Online)
        );
    }
}

//! The cluster's offline store in Redis (docs/CLUSTER.md, "Offline store in
//! Redis"): the Lua scripts that store, fetch, acknowledge and expire held
//! private messages, the commands that run them, and the decoding of their
//! replies. Sans-IO: commands are argument lists for
//! [`super::resp::encode_command`], replies are [`Frame`]s.
//!
//! Each script is one atomic step in Redis; that is what makes a private
//! that meets its recipient's join be delivered once (see `SEND`).

use super::resp::Frame;
use crate::store::outbox::{Full, Remembered};

/// Counted per held message beyond its strings, as by the local store.
pub const ENTRY_OVERHEAD: usize = 64;

/// Entries one `EXPIRE` call removes, at most (a script blocks Redis while
/// it runs).
pub const EXPIRE_BATCH: usize = 100;

/// Entries one `FETCH` returns, at most; the node fetches again after the
/// last one it got.
pub const FETCH_BATCH: usize = 1000;

/// KEYS: box, seq counter, held, due, recipient's lease, known names.
/// ARGV: from, to, id, ts, body, expires at (ms, 0 never), max per user,
/// max bytes, max per sender, max bytes per sender, seq floor, channel
/// prefix, sender node, tag, payload (the `priv` JSON), `1` if only names
/// that ever connected may be sent to.
///
/// Refuses a name that never connected (`unknown_user`), checks the quotas, numbers and appends the message, and if a node holds
/// the recipient's lease publishes it there in the same step. The quotas
/// are checked in the local store's order (`Outboxes::check_room`): the
/// recipient's count, the store's bytes (a full store is full for
/// everyone), then the sender's share. Answers
/// `{'live', NODE, SEQ}`, `{'queued', '', SEQ}`, `{'full', WHY, 0}` or
/// `{'unknown', '', 0}`.
const SEND_SCRIPT: &str = r#"
local from, to = ARGV[1], ARGV[2]
if ARGV[16] == '1' and redis.call('SISMEMBER', KEYS[6], to) == 0
  and redis.call('EXISTS', KEYS[5]) == 0 then
  return {'unknown', '', 0}
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[7]) then return {'full', 'user', 0} end
local cost = #ARGV[5] + #from + 64
local total = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
if total + cost > tonumber(ARGV[8]) then return {'full', 'store', 0} end
local sc = tonumber(redis.call('HGET', KEYS[3], 's:' .. from) or '0')
local sb = tonumber(redis.call('HGET', KEYS[3], 'b:' .. from) or '0')
if sc >= tonumber(ARGV[9]) or sb + cost > tonumber(ARGV[10]) then return {'full', 'sender', 0} end
local seq = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[11])
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[2], string.format('%.0f', seq))
end
-- Numbers as digits: Lua would print a seq of 16 digits as 1.78e+15.
local digits = string.format('%.0f', seq)
redis.call('XADD', KEYS[1], digits .. '-0', 'id', ARGV[3], 'ts', ARGV[4], 'from', from,
  'body', ARGV[5], 'exp', ARGV[6])
redis.call('HINCRBY', KEYS[3], 'bytes', cost)
redis.call('HINCRBY', KEYS[3], 'count', 1)
redis.call('HINCRBY', KEYS[3], 's:' .. from, 1)
redis.call('HINCRBY', KEYS[3], 'b:' .. from, cost)
if ARGV[6] ~= '0' then redis.call('ZADD', KEYS[4], ARGV[6], digits .. ' ' .. to) end
local node = redis.call('GET', KEYS[5])
if node then
  redis.call('PUBLISH', ARGV[12] .. ':node:' .. node,
    ARGV[13] .. ' spriv ' .. digits .. ' ' .. ARGV[14] .. ' ' .. ARGV[15])
  return {'live', node, seq}
end
return {'queued', '', seq}
"#;

/// KEYS: box, seq counter, held, due. ARGV: after (seq), count, `1` to
/// acknowledge up to `after` first (a reliable client's `resume`), name.
///
/// A resume point above anything the counter handed out (the client kept
/// a seq from before Redis lost its data) acknowledges nothing: everything
/// held is given again rather than dropped unread. Answers `{AFTER,
/// entries}`: the point used, and the entries above it in `seq` order.
const FETCH_BODY: &str = r#"
local after = tonumber(ARGV[1])
if after > tonumber(redis.call('GET', KEYS[2]) or '0') then after = 0 end
if ARGV[3] == '1' and after > 0 then
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', string.format('%.0f-0', after))) do
    redis.call('XDEL', KEYS[1], e[1])
    forget(KEYS[3], KEYS[4], ARGV[4], e)
  end
  if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
end
return {after,
  redis.call('XRANGE', KEYS[1], string.format('%.0f-0', after + 1), '+', 'COUNT', ARGV[2])}
"#;

/// Takes one held entry (`e` as `XRANGE` gives it) off the quotas and the
/// expiry set. The caller deletes it from the box first: a delete is let
/// through when Redis is out of memory (`maxmemory`, `noeviction`), and once
/// a script has written Redis lets the rest of it run, so a full store can
/// still be drained (an `HINCRBY` first would be refused with `OOM`).
const FORGET_ENTRY: &str = r#"
local function forget(held, due, name, e)
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  local cost = #f['body'] + #f['from'] + 64
  local seq = string.match(e[1], '^(%d+)')
  redis.call('HINCRBY', held, 'bytes', -cost)
  redis.call('HINCRBY', held, 'count', -1)
  if redis.call('HINCRBY', held, 's:' .. f['from'], -1) <= 0 then
    redis.call('HDEL', held, 's:' .. f['from'], 'b:' .. f['from'])
  else
    redis.call('HINCRBY', held, 'b:' .. f['from'], -cost)
  end
  if f['exp'] ~= '0' then redis.call('ZREM', due, seq .. ' ' .. name) end
  return seq, f
end
"#;

/// KEYS: box, held, due. ARGV: from (seq), up to (seq), name.
/// Removes every entry numbered from `from` to `up to`, both included
/// (`0..=N` for a cumulative `ack N`; `N..=N` for one message written to a
/// simple client, or taken back); answers how many.
const ACK_BODY: &str = r#"
local es = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', ARGV[2] .. '-0')
for _, e in ipairs(es) do
  redis.call('XDEL', KEYS[1], e[1])
  forget(KEYS[2], KEYS[3], ARGV[3], e)
end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return #es
"#;

/// KEYS: held, due. ARGV: now (ms), at most, box key prefix (`P:box:`).
/// Removes held entries due by `now`; answers `{name, seq, id, from}` for
/// each (the senders are told `expired`).
const EXPIRE_BODY: &str = r#"
local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  local seq, name = string.match(m, '^(%d+) (.*)$')
  local box = ARGV[3] .. name
  local es = redis.call('XRANGE', box, seq .. '-0', seq .. '-0')
  if #es == 1 then
    redis.call('XDEL', box, es[1][1])
    local _, f = forget(KEYS[1], KEYS[2], name, es[1])
    if redis.call('XLEN', box) == 0 then redis.call('DEL', box) end
    table.insert(out, {name, seq, f['id'], f['from']})
  else
    redis.call('ZREM', KEYS[2], m)
  end
end
return out
"#;

/// KEYS: box, seq counter, held, due, migrated, recipient's lease, known
/// names. ARGV: to, id, ts, from, body, expires at (ms, 0 never), seq
/// floor, channel prefix, node, payload (the `spriv` JSON).
///
/// Uploads one message of a local log (migration to the cluster). Once per
/// message: `P:migrated` remembers what was uploaded (by recipient, id,
/// sender and time), so a second upload of the same log adds nothing; the
/// mark is written last, so a message is never marked and not stored. The
/// message is numbered anew from the cluster's counter (above the floor):
/// every number the old server gave is below the node's clock × 1000, so a
/// client's old cursor skips nothing, and a box emptied (and deleted) in
/// Redis cannot take a number below what its user was given. If a node
/// holds the recipient's lease, the message is published to it, as `SEND`
/// does, or a live user would not get it before acknowledging later ones.
/// The recipient becomes a known name. No quota refuses it: mail that was
/// accepted is not dropped on the way. Answers `{'stored'|'dup', SEQ}`.
const MIGRATE_SCRIPT: &str = r#"
local to, from = ARGV[1], ARGV[4]
local mark = to .. ' ' .. ARGV[2] .. ' ' .. from .. ' ' .. ARGV[3]
local before = redis.call('HGET', KEYS[5], mark)
if before then return {'dup', tonumber(before)} end
local seq = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[7])
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[2], string.format('%.0f', seq))
end
local digits = string.format('%.0f', seq)
redis.call('XADD', KEYS[1], digits .. '-0', 'id', ARGV[2], 'ts', ARGV[3], 'from', from,
  'body', ARGV[5], 'exp', ARGV[6])
local cost = #ARGV[5] + #from + 64
redis.call('HINCRBY', KEYS[3], 'bytes', cost)
redis.call('HINCRBY', KEYS[3], 'count', 1)
redis.call('HINCRBY', KEYS[3], 's:' .. from, 1)
redis.call('HINCRBY', KEYS[3], 'b:' .. from, cost)
if ARGV[6] ~= '0' then redis.call('ZADD', KEYS[4], ARGV[6], digits .. ' ' .. to) end
redis.call('SADD', KEYS[7], to)
local node = redis.call('GET', KEYS[6])
if node then
  redis.call('PUBLISH', ARGV[8] .. ':node:' .. node,
    ARGV[9] .. ' spriv ' .. digits .. ' 0 ' .. ARGV[10])
end
redis.call('HSET', KEYS[5], mark, digits)
return {'stored', seq}
"#;

/// KEYS: known names. ARGV: name, at most.
/// Remembers a name that connected. Answers `new`, `known` or `full`.
const REMEMBER_SCRIPT: &str = r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 'known' end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 'full' end
redis.call('SADD', KEYS[1], ARGV[1])
return 'new'
"#;

/// The quotas, cluster-wide (`--offline-max-*`, `--offline-ttl`).
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    pub max_per_user: usize,
    pub max_bytes: usize,
    pub max_per_sender: usize,
    pub max_bytes_per_sender: usize,
    /// 0: held messages never expire.
    pub ttl_ms: u64,
    /// Only names that ever connected may be sent to (without
    /// `--offline-to-unknown`).
    pub known_only: bool,
}

/// A private message to store.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub id: u64,
    pub ts: u64,
    pub body: &'a str,
    /// Matches the receipt the recipient's node sends back.
    pub tag: u64,
    /// The `priv` JSON published to the recipient's node when it is live.
    pub payload: &'a str,
}

/// What `SEND` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Stored, and published to the node holding the recipient's lease.
    Live {
        node: String,
        seq: u64,
    },
    /// Stored; nobody holds the recipient's lease.
    Queued(u64),
    Full(Full),
    /// Nobody ever connected under the name (`unknown_user`).
    Unknown,
}

/// A held message as `FETCH` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub seq: u64,
    pub id: u64,
    pub ts: u64,
    pub from: String,
    pub body: String,
    /// Its sender was told it was delivered (kept by the local store, so a
    /// replay does not tell it twice; the Redis store does not keep it).
    pub notified: bool,
}

/// What `MIGRATE` did with one message of a local log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    /// Uploaded, under this `seq` of the cluster's.
    Stored(u64),
    /// Uploaded before (under this `seq`).
    Duplicate(u64),
}

/// A held message `EXPIRE` removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub to: String,
    pub seq: u64,
    pub id: u64,
    pub from: String,
    /// Its sender was told it was delivered: it goes quietly (local store only).
    pub notified: bool,
}

/// A reply that is not what the script returns: Redis answered an error,
/// or something else speaks on the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadReply(pub String);

impl std::fmt::Display for BadReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unexpected reply from the offline store: {}", self.0)
    }
}

impl std::error::Error for BadReply {}

/// One script: its text, and the SHA-1 Redis knows it by once loaded.
#[derive(Debug, Clone)]
struct Script {
    text: String,
    sha: String,
}

impl Script {
    fn new(text: String) -> Script {
        let sha = sha1_smol::Sha1::from(&text).digest().to_string();
        Script { text, sha }
    }
}

/// The keys and scripts of one cluster's store.
#[derive(Debug, Clone)]
pub struct Store {
    prefix: String,
    send: Script,
    fetch: Script,
    ack: Script,
    expire: Script,
    migrate: Script,
    remember: Script,
    /// Commands name their script by SHA-1 (`EVALSHA`), after
    /// [`loads`](Self::loads) ran on the same connection: a message then
    /// costs Redis its arguments, not the script's kilobyte and a parse.
    pub by_sha: bool,
}

type Args = Vec<Vec<u8>>;

fn num(n: impl ToString) -> Vec<u8> {
    n.to_string().into_bytes()
}

impl Store {
    pub fn new(prefix: &str) -> Store {
        Store {
            prefix: prefix.to_owned(),
            send: Script::new(SEND_SCRIPT.to_owned()),
            fetch: Script::new(format!("{FORGET_ENTRY}{FETCH_BODY}")),
            ack: Script::new(format!("{FORGET_ENTRY}{ACK_BODY}")),
            expire: Script::new(format!("{FORGET_ENTRY}{EXPIRE_BODY}")),
            migrate: Script::new(MIGRATE_SCRIPT.to_owned()),
            remember: Script::new(REMEMBER_SCRIPT.to_owned()),
            by_sha: false,
        }
    }

    /// `SCRIPT LOAD` for every script: sent first on a new connection, so
    /// that what follows on it can name them by SHA-1. (A Redis that lost
    /// them, restarted or flushed, answers `NOSCRIPT`; the node then drops
    /// the connection and loads them again on the new one.)
    pub fn loads(&self) -> Vec<Args> {
        [
            &self.send,
            &self.fetch,
            &self.ack,
            &self.expire,
            &self.migrate,
            &self.remember,
        ]
        .into_iter()
        .map(|s| {
            vec![
                b"SCRIPT".to_vec(),
                b"LOAD".to_vec(),
                s.text.clone().into_bytes(),
            ]
        })
        .collect()
    }

    fn eval(&self, script: &Script, keys: Vec<String>, argv: Vec<Vec<u8>>) -> Args {
        let mut args: Args = Vec::with_capacity(3 + keys.len() + argv.len());
        if self.by_sha {
            args.push(b"EVALSHA".to_vec());
            args.push(script.sha.clone().into_bytes());
        } else {
            args.push(b"EVAL".to_vec());
            args.push(script.text.clone().into_bytes());
        }
        args.push(keys.len().to_string().into_bytes());
        args.extend(keys.into_iter().map(String::into_bytes));
        args.extend(argv);
        args
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.prefix)
    }

    fn outbox(&self, name: &str) -> String {
        format!("{}:box:{name}", self.prefix)
    }

    /// `SEND`: store `msg` (numbered above `seq_floor`) and publish it to
    /// the recipient's node if one holds its lease. `node` is the sender's
    /// node id, `now_ms` the wall clock.
    pub fn send(
        &self,
        msg: &Outgoing<'_>,
        quotas: &Quotas,
        seq_floor: u64,
        node: &str,
        now_ms: u64,
    ) -> Args {
        let expires = if quotas.ttl_ms == 0 {
            0
        } else {
            now_ms.saturating_add(quotas.ttl_ms)
        };
        let keys = vec![
            self.outbox(msg.to),
            self.key("seq"),
            self.key("held"),
            self.key("due"),
            self.key(&format!("name:{}", msg.to)),
            self.key("known"),
        ];
        let argv = vec![
            msg.from.as_bytes().to_vec(),
            msg.to.as_bytes().to_vec(),
            num(msg.id),
            num(msg.ts),
            msg.body.as_bytes().to_vec(),
            num(expires),
            num(quotas.max_per_user),
            num(quotas.max_bytes),
            num(quotas.max_per_sender),
            num(quotas.max_bytes_per_sender),
            num(seq_floor),
            self.prefix.as_bytes().to_vec(),
            node.as_bytes().to_vec(),
            num(msg.tag),
            msg.payload.as_bytes().to_vec(),
            num(u8::from(quotas.known_only)),
        ];
        self.eval(&self.send, keys, argv)
    }

    /// `REMEMBER`: `name` connected; at most `max_known` names are kept.
    pub fn remember(&self, name: &str, max_known: usize) -> Args {
        self.eval(
            &self.remember,
            vec![self.key("known")],
            vec![name.as_bytes().to_vec(), num(max_known)],
        )
    }

    /// `FETCH`: what `name` has held above `after`, [`FETCH_BATCH`] at
    /// most; with `ack`, what is at or below `after` is removed first.
    pub fn fetch(&self, name: &str, after: u64, ack: bool) -> Args {
        self.eval(
            &self.fetch,
            vec![
                self.outbox(name),
                self.key("seq"),
                self.key("held"),
                self.key("due"),
            ],
            vec![
                num(after),
                num(FETCH_BATCH),
                num(u8::from(ack)),
                name.as_bytes().to_vec(),
            ],
        )
    }

    /// `ACK`: remove what `name` holds numbered `from..=to`.
    pub fn ack(&self, name: &str, from: u64, to: u64) -> Args {
        self.eval(
            &self.ack,
            vec![self.outbox(name), self.key("held"), self.key("due")],
            vec![num(from), num(to), name.as_bytes().to_vec()],
        )
    }

    /// `MIGRATE`: upload one held message of a local log, held for `to`,
    /// expiring at `expires_ms` (0 never), numbered above `seq_floor`, and
    /// published to the recipient's node (in `node`'s name) if one holds it.
    pub fn migrate(
        &self,
        to: &str,
        held: &Held,
        expires_ms: u64,
        seq_floor: u64,
        node: &str,
        payload: &str,
    ) -> Args {
        let keys = vec![
            self.outbox(to),
            self.key("seq"),
            self.key("held"),
            self.key("due"),
            self.key("migrated"),
            self.key(&format!("name:{to}")),
            self.key("known"),
        ];
        let argv = vec![
            to.as_bytes().to_vec(),
            num(held.id),
            num(held.ts),
            held.from.as_bytes().to_vec(),
            held.body.as_bytes().to_vec(),
            num(expires_ms),
            num(seq_floor),
            self.prefix.as_bytes().to_vec(),
            node.as_bytes().to_vec(),
            payload.as_bytes().to_vec(),
        ];
        self.eval(&self.migrate, keys, argv)
    }

    /// `EXPIRE`: remove what is due by `now_ms`, [`EXPIRE_BATCH`] at most.
    pub fn expire(&self, now_ms: u64) -> Args {
        self.eval(
            &self.expire,
            vec![self.key("held"), self.key("due")],
            vec![
                num(now_ms),
                num(EXPIRE_BATCH),
                self.key("box:").into_bytes(),
            ],
        )
    }
}

fn text(frame: &Frame) -> Option<&str> {
    frame.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
}

fn number(frame: &Frame) -> Option<u64> {
    match frame {
        Frame::Integer(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

fn bad(frame: &Frame) -> BadReply {
    let mut shown = format!("{frame:?}");
    shown.truncate(200);
    BadReply(shown)
}

/// Decodes `SEND`'s reply.
pub fn sent(frame: &Frame) -> Result<Sent, BadReply> {
    let Frame::Array(Some(items)) = frame else {
        return Err(bad(frame));
    };
    let decoded = match items.as_slice() {
        [kind, what, seq] => match (text(kind), text(what), number(seq)) {
            (Some("live"), Some(node), Some(seq)) => Some(Sent::Live {
                node: node.to_owned(),
                seq,
            }),
            (Some("queued"), _, Some(seq)) => Some(Sent::Queued(seq)),
            (Some("full"), Some("user"), _) => Some(Sent::Full(Full::User)),
            (Some("full"), Some("sender"), _) => Some(Sent::Full(Full::Sender)),
            (Some("full"), Some("store"), _) => Some(Sent::Full(Full::Store)),
            (Some("unknown"), _, _) => Some(Sent::Unknown),
            _ => None,
        },
        _ => None,
    };
    decoded.ok_or_else(|| bad(frame))
}

/// What `FETCH` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The resume point used: the one asked for, or 0 when it was above
    /// anything handed out.
    pub after: u64,
    pub held: Vec<Held>,
}

/// Decodes `FETCH`'s reply: the point used, then entries `[SEQ-0, [field, value, ...]]`.
pub fn fetched(frame: &Frame) -> Result<Fetched, BadReply> {
    let Frame::Array(Some(parts)) = frame else {
        return Err(bad(frame));
    };
    let [after, Frame::Array(Some(entries))] = parts.as_slice() else {
        return Err(bad(frame));
    };
    let after = number(after).ok_or_else(|| bad(frame))?;
    let held = entries
        .iter()
        .map(|entry| held(entry).ok_or_else(|| bad(entry)))
        .collect::<Result<_, _>>()?;
    Ok(Fetched { after, held })
}

fn held(entry: &Frame) -> Option<Held> {
    let Frame::Array(Some(parts)) = entry else {
        return None;
    };
    let [id, Frame::Array(Some(fields))] = parts.as_slice() else {
        return None;
    };
    let seq = text(id)?.strip_suffix("-0")?.parse().ok()?;
    let mut msg = Held {
        seq,
        id: 0,
        ts: 0,
        from: String::new(),
        body: String::new(),
        notified: false,
    };
    for pair in fields.chunks(2) {
        let [name, value] = pair else { return None };
        match text(name)? {
            "id" => msg.id = number(value)?,
            "ts" => msg.ts = number(value)?,
            "from" => msg.from = text(value)?.to_owned(),
            "body" => msg.body = text(value)?.to_owned(),
            _ => {}
        }
    }
    Some(msg)
}

/// Decodes `REMEMBER`'s reply.
pub fn remembered(frame: &Frame) -> Result<Remembered, BadReply> {
    match text(frame) {
        Some("new") => Ok(Remembered::New),
        Some("known") => Ok(Remembered::AlreadyKnown),
        Some("full") => Ok(Remembered::Full),
        _ => Err(bad(frame)),
    }
}

/// Decodes `MIGRATE`'s reply.
pub fn migrated(frame: &Frame) -> Result<Migrated, BadReply> {
    let Frame::Array(Some(items)) = frame else {
        return Err(bad(frame));
    };
    match items.as_slice() {
        [how, seq] => match (text(how), number(seq)) {
            (Some("stored"), Some(seq)) => Some(Migrated::Stored(seq)),
            (Some("dup"), Some(seq)) => Some(Migrated::Duplicate(seq)),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| bad(frame))
}

/// Decodes `ACK`'s reply: how many entries it removed.
pub fn acked(frame: &Frame) -> Result<u64, BadReply> {
    match frame {
        Frame::Integer(n) => u64::try_from(*n).map_err(|_| bad(frame)),
        _ => Err(bad(frame)),
    }
}

/// Decodes `EXPIRE`'s reply.
pub fn expired(frame: &Frame) -> Result<Vec<Expired>, BadReply> {
    let Frame::Array(Some(items)) = frame else {
        return Err(bad(frame));
    };
    items
        .iter()
        .map(|item| {
            let Frame::Array(Some(parts)) = item else {
                return Err(bad(item));
            };
            match parts.as_slice() {
                [to, seq, id, from] => Some(Expired {
                    to: text(to).unwrap_or_default().to_owned(),
                    seq: number(seq).unwrap_or_default(),
                    id: number(id).unwrap_or_default(),
                    from: text(from).unwrap_or_default().to_owned(),
                    notified: false,
                })
                .filter(|e| !e.to.is_empty() && e.seq > 0),
                _ => None,
            }
            .ok_or_else(|| bad(item))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(s.as_bytes().to_vec()))
    }

    fn array(items: Vec<Frame>) -> Frame {
        Frame::Array(Some(items))
    }

    #[test]
    fn send_replies_decode_as_a_table() {
        let cases = [
            (
                array(vec![bulk("live"), bulk("00ab"), Frame::Integer(7)]),
                Ok(Sent::Live {
                    node: "00ab".into(),
                    seq: 7,
                }),
            ),
            (
                array(vec![bulk("queued"), bulk(""), Frame::Integer(8)]),
                Ok(Sent::Queued(8)),
            ),
            (
                array(vec![bulk("full"), bulk("user"), Frame::Integer(0)]),
                Ok(Sent::Full(Full::User)),
            ),
            (
                array(vec![bulk("full"), bulk("sender"), Frame::Integer(0)]),
                Ok(Sent::Full(Full::Sender)),
            ),
            (
                array(vec![bulk("full"), bulk("store"), Frame::Integer(0)]),
                Ok(Sent::Full(Full::Store)),
            ),
            (
                array(vec![bulk("unknown"), bulk(""), Frame::Integer(0)]),
                Ok(Sent::Unknown),
            ),
        ];
        for (frame, want) in cases {
            assert_eq!(sent(&frame), want, "{frame:?}");
        }
        for frame in [
            Frame::Error("ERR NOSCRIPT".into()),
            array(vec![bulk("full"), bulk("disk"), Frame::Integer(0)]),
            array(vec![bulk("queued"), bulk(""), Frame::Integer(-1)]),
            array(vec![bulk("queued")]),
            Frame::Integer(1),
        ] {
            assert!(sent(&frame).is_err(), "{frame:?}");
        }
    }

    #[test]
    fn migrate_replies_decode_as_a_table() {
        let reply = |how: &str, seq: i64| array(vec![bulk(how), Frame::Integer(seq)]);
        assert_eq!(migrated(&reply("stored", 9)), Ok(Migrated::Stored(9)));
        assert_eq!(migrated(&reply("dup", 5)), Ok(Migrated::Duplicate(5)));
        assert!(migrated(&reply("lost", 5)).is_err());
        assert!(migrated(&reply("stored", -1)).is_err());
        assert!(migrated(&Frame::Error("ERR".into())).is_err());
    }

    #[test]
    fn fetched_entries_decode_and_a_malformed_one_is_an_error() {
        let entry = array(vec![
            bulk("12-0"),
            array(vec![
                bulk("id"),
                bulk("99"),
                bulk("ts"),
                bulk("1700"),
                bulk("from"),
                bulk("ann"),
                bulk("body"),
                bulk("hi"),
                bulk("exp"),
                bulk("0"),
            ]),
        ]);
        let want = Held {
            seq: 12,
            id: 99,
            ts: 1700,
            from: "ann".into(),
            body: "hi".into(),
            notified: false,
        };
        let reply =
            |after: i64, entries: Vec<Frame>| array(vec![Frame::Integer(after), array(entries)]);
        assert_eq!(
            fetched(&reply(3, vec![entry])),
            Ok(Fetched {
                after: 3,
                held: vec![want]
            })
        );
        assert_eq!(
            fetched(&reply(0, vec![])),
            Ok(Fetched {
                after: 0,
                held: vec![]
            })
        );
        let bad_id = reply(0, vec![array(vec![bulk("12-1"), array(vec![])])]);
        assert!(fetched(&bad_id).is_err());
        let odd = reply(0, vec![array(vec![bulk("12-0"), array(vec![bulk("id")])])]);
        assert!(fetched(&odd).is_err());
        assert!(fetched(&array(vec![])).is_err());
        assert!(fetched(&Frame::Error("ERR".into())).is_err());
    }

    #[test]
    fn commands_name_the_prefixed_keys() {
        let store = Store::new("wx");
        let ack = store.ack("bob", 0, 5);
        assert_eq!(ack[0], b"EVAL");
        assert_eq!(ack[2], b"3");
        assert_eq!(ack[3], b"wx:box:bob");
        assert_eq!(ack[4], b"wx:held");
        assert_eq!(ack[5], b"wx:due");
        let quotas = Quotas {
            max_per_user: 1,
            max_bytes: 2,
            max_per_sender: 3,
            max_bytes_per_sender: 4,
            ttl_ms: 0,
            known_only: true,
        };
        let msg = Outgoing {
            from: "ann",
            to: "bob",
            id: 1,
            ts: 2,
            body: "x",
            tag: 3,
            payload: "{}",
        };
        let send = store.send(&msg, &quotas, 0, "n1", 1000);
        assert_eq!(send[2], b"6");
        assert_eq!(send[7], b"wx:name:bob");
        // Without a TTL nothing is put on the expiry set.
        assert_eq!(send[9 + 5], b"0");
        assert_eq!(send.last().map(Vec::as_slice), Some(&b"1"[..]));
        let send = store.send(
            &msg,
            &Quotas {
                ttl_ms: 500,
                ..quotas
            },
            0,
            "n1",
            1000,
        );
        assert_eq!(send[9 + 5], b"1500");
    }
}

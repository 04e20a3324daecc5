#!/usr/bin/env python3
"""Chaos checker for wschat --cluster: a long randomized attack run (not part of `cargo test`).

It starts redis-server (AOF with `appendfsync always`) and N wschat nodes on 127.0.0.1,
each on a free port with its own data dir in a temp dir. Senders send numbered privates
(with `ref`) and record each one's outcome: its receipt (`delivered`/`queued`), its error
code, or `unknown` when their connection dropped first. Receivers hop to a random node
every 0.5-2 s: reliable ones (`r*`) connect with `resume=LASTSEQ`, ack every private and
sometimes drop TCP without a close; simple ones (`p*`) close cleanly. Meanwhile a node,
Redis, both, or two nodes are killed -9 at random and restarted on the same port and dir.
At the end everything is up again, senders wait for their outcomes and every receiver
drains once more; then every private's receptions are counted.

Exit status 1 (a failure) when: a `queued`/`delivered` private was never received (LOST);
a private refused with a definite error (any code but `unconfirmed`, e.g.
`cluster_unavailable`) was received anyway; a reliable receiver got a private twice or
its seqs went backwards; a private reached someone else. Not failures, only counted:
`unconfirmed` and `unknown` outcomes (received or not), and a simple receiver getting a
private twice (the at-least-once windows of docs/CLUSTER.md "Known gaps"). Exit status 2:
the run could not be carried out (no binary, no redis-server, a node that would not start).

Run from the repository root (about 70 s a run; `--hard` about 85 s):

    cargo build --release
    python3 tests/chaos/chaos.py --seed 1
    python3 tests/chaos/chaos.py --seed 4 --hard

The binary is --bin (default: target/release/wschat of this repository, or under
$CARGO_TARGET_DIR); redis-server is taken from PATH. --out (default: a fresh temp dir,
printed) gets report.txt (counts, each failure with the chaos around it), raw.json (every
message, reception and session) and the node and Redis logs. A seed fixes the schedule of
kills; the traffic's timing still varies from run to run. Extra wschat flags go after `--`.
"""
import argparse
import collections
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ws import WS, Closed, HandshakeError  # noqa: E402

HOST = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T0 = time.time()


def now():
    return round(time.time() - T0, 3)


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    p = s.getsockname()[1]
    s.close()
    return p


LOCK = threading.Lock()
EVENTS = []  # (t, kind, detail) chaos and infrastructure events


def event(kind, detail=""):
    with LOCK:
        EVENTS.append((now(), kind, detail))
    print(f"[{now():8.3f}] {kind} {detail}", flush=True)


class Cluster:
    def __init__(self, binary, workdir, nodes, lease, extra):
        self.binary = binary
        self.workdir = workdir
        self.redis_port = free_port()
        self.redis_dir = os.path.join(workdir, "redis")
        os.makedirs(self.redis_dir)
        self.ports = [free_port() for _ in range(nodes)]
        self.data = [os.path.join(workdir, f"node{i}-data") for i in range(nodes)]
        for d in self.data:
            os.makedirs(d)
        self.procs = [None] * nodes
        self.redis = None
        self.lease = lease
        self.extra = extra
        self.mu = threading.Lock()
        self.node_starts = [0] * nodes
        self.crashes = []  # (t, node, returncode) of nodes found exited by themselves
        self.crashed_seen = set()

    def url(self):
        return f"redis://{HOST}:{self.redis_port}"

    def start_redis(self):
        log = open(os.path.join(self.workdir, "redis.log"), "a")
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", HOST, "--dir", self.redis_dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                s = socket.create_connection((HOST, self.redis_port), timeout=0.5)
                s.sendall(b"PING\r\n")
                r = s.recv(100)
                s.close()
                if r.startswith(b"+PONG"):
                    event("redis_up", f"pid={self.redis.pid}")
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def kill_redis(self):
        self.redis.kill()
        self.redis.wait()
        event("redis_killed", "")

    def start_node(self, i):
        self.node_starts[i] += 1
        log = open(os.path.join(self.workdir, f"node{i}.log"), "a")
        log.write(f"=== chaos: start #{self.node_starts[i]} of node{i} at t={now()} "
                  f"(wall {time.time():.3f})\n")
        log.flush()
        args = [self.binary, "--listen", f"{HOST}:{self.ports[i]}", "--data-dir", self.data[i],
                "--cluster", self.url(), "--cluster-lease", self.lease, "--rate-limit", "0",
                "--max-handshakes-per-ip", "0", "--max-connections-per-ip", "0"] + self.extra
        self.procs[i] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.crashed_seen.discard(i)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"node{i} exited rc={self.procs[i].returncode}")
            try:
                socket.create_connection((HOST, self.ports[i]), timeout=0.5).close()
                event("node_up", f"node{i} port={self.ports[i]} pid={self.procs[i].pid}")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"node{i} did not listen")

    def kill_node(self, i):
        self.check_alive(i)
        self.procs[i].kill()
        self.procs[i].wait()
        event("node_killed", f"node{i}")

    def check_alive(self, i):
        """Note a node that exited by itself (not killed here): a crash."""
        p = self.procs[i]
        if p is not None and p.poll() is not None and i not in self.crashed_seen:
            self.crashed_seen.add(i)
            self.crashes.append((now(), i, p.returncode))
            event("node_crashed", f"node{i} rc={p.returncode}")

    def stop_all(self):
        for i, p in enumerate(self.procs):
            if p and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        if self.redis and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.redis.kill()


class Msg:
    __slots__ = ("key", "sender", "to", "t_sent", "node", "outcome", "t_outcome", "id", "later")

    def __init__(self, key, sender, to, t, node):
        self.key, self.sender, self.to, self.t_sent, self.node = key, sender, to, t, node
        self.outcome = None
        self.t_outcome = None
        self.id = None
        self.later = []


MSGS = {}  # key -> Msg
STOP_SEND = threading.Event()
STOP_HOP = threading.Event()
SEND_DONE_BY = [0.0]


def connect(cluster, rng, name, query=""):
    node = rng.randrange(len(cluster.ports))
    ws = WS(HOST, cluster.ports[node], f"/ws?username={name}{query}")
    deadline = time.time() + 8
    while time.time() < deadline:
        m = ws.recv(max(0.05, deadline - time.time()))
        if m is None:
            continue
        if m.get("type") == "welcome":
            return ws, node, []
        if m.get("type") == "error":
            pass  # username_taken etc.; the close follows
    ws.close_sock()
    raise HandshakeError("no welcome")


class Sender(threading.Thread):
    def __init__(self, name, cluster, receivers, seed, window, gap):
        super().__init__(daemon=True)
        self.name, self.cluster, self.receivers = name, cluster, receivers
        self.rng = random.Random(seed)
        self.window, self.gap = window, gap
        self.n = 0
        self.sessions = []
        self.stray = []

    def run(self):
        while not STOP_SEND.is_set():
            try:
                ws, node, _ = connect(self.cluster, self.rng, self.name)
            except (OSError, HandshakeError, Closed):
                time.sleep(self.rng.uniform(0.1, 0.4))
                continue
            self.session(ws, node)
        # afterwards: nothing (session drains before returning)

    def session(self, ws, node):
        t_start = now()
        outstanding = {}
        hop_at = time.time() + self.rng.uniform(5, 15)
        next_send = time.time()
        reason = "?"
        try:
            while True:
                t = time.time()
                stopping = STOP_SEND.is_set() or t >= hop_at
                if stopping:
                    if not outstanding or t > (SEND_DONE_BY[0] if STOP_SEND.is_set() else hop_at + 7):
                        reason = "stop" if STOP_SEND.is_set() else "hop"
                        break
                elif len(outstanding) < self.window and t >= next_send:
                    self.n += 1
                    key = f"{self.name}-{self.n}"
                    to = self.rng.choice(self.receivers)
                    with LOCK:
                        MSGS[key] = Msg(key, self.name, to, now(), node)
                    outstanding[self.n] = key
                    ws.send_json({"type": "private", "to": to, "body": key, "ref": self.n})
                    next_send = t + self.rng.uniform(*self.gap)
                m = ws.recv(0.02)
                if m is not None:
                    self.handle(m, outstanding)
        except Closed as e:
            reason = f"closed {e.code} {e.reason}"
        except OSError as e:
            reason = f"oserror {e}"
        if reason in ("stop", "hop"):
            ws.send_close()
            try:
                while True:
                    m = ws.recv(2)
                    if m is None:
                        break
                    self.handle(m, outstanding)
            except (Closed, OSError):
                pass
        ws.close_sock()
        t = now()
        with LOCK:
            for ref, key in outstanding.items():
                m = MSGS[key]
                if m.outcome is None:
                    m.outcome = "unknown"
                    m.t_outcome = t
        self.sessions.append((t_start, node, t, reason, len(outstanding)))
        if reason not in ("stop", "hop"):
            event("sender_lost", f"{self.name} node{node} {reason} unknown={len(outstanding)}")
            time.sleep(self.rng.uniform(0.1, 0.3))

    def handle(self, m, outstanding):
        ty = m.get("type")
        ref = m.get("ref")
        if ty == "receipt":
            if ref is not None and ref in outstanding:
                key = outstanding.pop(ref)
                with LOCK:
                    msg = MSGS[key]
                    msg.outcome = m["status"]
                    msg.t_outcome = now()
                    msg.id = m["id"]
                    ID_TO_KEY[m["id"]] = key
            else:
                with LOCK:
                    key = ID_TO_KEY.get(m.get("id"))
                    if key:
                        MSGS[key].later.append((now(), m.get("status"), ref))
                    else:
                        self.stray.append((now(), m))
        elif ty == "error":
            if ref is not None and ref in outstanding:
                key = outstanding.pop(ref)
                with LOCK:
                    msg = MSGS[key]
                    msg.outcome = "error:" + m.get("code", "?")
                    msg.t_outcome = now()
            else:
                self.stray.append((now(), m))


ID_TO_KEY = {}
# error codes meaning "sent to Redis, answer lost: may have been stored and delivered";
# counted like "unknown" (a reception is not a failure). Every other error code (including
# cluster_unavailable, "definitely not stored") received is a failure.
MAYBE_STORED = {"unknown", "error:unconfirmed"}


class Receiver(threading.Thread):
    def __init__(self, name, reliable, cluster, seed, hop):
        super().__init__(daemon=True)
        self.name, self.reliable, self.cluster = name, reliable, cluster
        self.rng = random.Random(seed)
        self.hop = hop
        self.last_seq = 0
        self.receptions = []  # dict per private received
        self.sessions = []
        self.refusals = collections.Counter()
        self.session_no = 0
        self.welcomed = threading.Event()
        self.final_done = False

    def query(self):
        return f"&resume={self.last_seq}" if self.reliable else ""

    def record(self, m, node, phase):
        if m.get("type") != "private":
            return
        r = {"t": now(), "session": self.session_no, "node": node, "id": m.get("id"),
             "seq": m.get("seq"), "body": m.get("body"), "from": m.get("from"), "to": m.get("to"),
             "offline": bool(m.get("offline")), "phase": phase}
        self.receptions.append(r)
        if self.reliable and isinstance(r["seq"], int) and r["seq"] > self.last_seq:
            self.last_seq = r["seq"]

    def run(self):
        while not STOP_HOP.is_set():
            self.one_session(final=False)
        # final drain: retry until one session got its welcome and went quiet
        deadline = time.time() + 40
        while time.time() < deadline and not self.final_done:
            self.one_session(final=True)

    def one_session(self, final):
        resume = self.last_seq
        try:
            ws, node, _ = connect(self.cluster, self.rng, self.name, self.query())
        except Closed as e:
            self.refusals[f"close {e.code}"] += 1
            time.sleep(self.rng.uniform(0.1, 0.4))
            return
        except (OSError, HandshakeError) as e:
            self.refusals[type(e).__name__] += 1
            time.sleep(self.rng.uniform(0.1, 0.4))
            return
        self.session_no += 1
        self.welcomed.set()
        t_start = now()
        reason = "?"
        quiet = 5.0
        hop_at = time.time() + self.rng.uniform(*self.hop)
        last_rx = time.time()
        try:
            while True:
                t = time.time()
                if final:
                    if t - last_rx > quiet:
                        reason = "final-quiet"
                        break
                elif t >= hop_at or STOP_HOP.is_set():
                    reason = "hop"
                    break
                m = ws.recv(0.1)
                if m is not None:
                    last_rx = time.time()
                    self.record(m, node, "live")
                    if self.reliable and m.get("type") == "private":
                        ws.send_json({"type": "ack", "seq": self.last_seq})
        except Closed as e:
            reason = f"closed {e.code} {e.reason}"
        except OSError as e:
            reason = f"oserror {e}"
        abrupt = False
        if reason in ("hop", "final-quiet"):
            if self.reliable and not final and self.rng.random() < 0.3:
                abrupt = True  # drop TCP without a close frame: resume must cover it
            else:
                ws.send_close()
                try:
                    while True:
                        m = ws.recv(3)
                        if m is None:
                            reason += " (no close reply)"
                            break
                        self.record(m, node, "closing")
                except (Closed, OSError):
                    pass
        ws.close_sock()
        if final and reason == "final-quiet":
            self.final_done = True
        elif not final and not STOP_HOP.is_set():
            time.sleep(self.rng.uniform(0, 0.6))  # offline a while: messages get queued
        self.sessions.append({"n": self.session_no, "node": node, "resume": resume, "t0": t_start,
                              "t1": now(), "end": reason, "abrupt": abrupt, "final": final})


def chaos(cluster, rng, duration, downtime, pause=(1.5, 5)):
    end = time.time() + duration
    time.sleep(rng.uniform(2, 4))
    while time.time() < end:
        action = rng.choices(["node", "redis", "node+redis", "two-nodes"], [50, 25, 15, 10])[0]
        nodes = []
        if action in ("node", "node+redis"):
            nodes = [rng.randrange(len(cluster.ports))]
        elif action == "two-nodes":
            nodes = rng.sample(range(len(cluster.ports)), 2)
        event("chaos", action + " " + ",".join(f"node{i}" for i in nodes))
        if "redis" in action:
            cluster.kill_redis()
        for i in nodes:
            time.sleep(rng.uniform(0, 0.3))
            cluster.kill_node(i)
        time.sleep(rng.uniform(*downtime))
        if "redis" in action:
            cluster.start_redis()
        for i in nodes:
            time.sleep(rng.uniform(0, 0.5))
            cluster.start_node(i)
        time.sleep(rng.uniform(*pause))


def analyse(receivers, senders, cluster, out_dir, args, commit):
    """Count every private's receptions, write report.txt and raw.json; return the failures."""
    lines = []
    P = lines.append
    kinds = {r.name: ("reliable" if r.reliable else "simple") for r in receivers}
    by_key = collections.defaultdict(list)  # body -> [(receiver, reception)] by its addressee
    wrong, unknown_body = [], []
    for r in receivers:
        for x in r.receptions:
            b = x["body"]
            if b not in MSGS:
                unknown_body.append((r.name, x))
            elif MSGS[b].to != r.name:
                wrong.append((r.name, x))
            else:
                by_key[b].append((r.name, x))

    outcomes = collections.Counter(m.outcome or "none" for m in MSGS.values())
    table = collections.defaultdict(collections.Counter)  # (outcome, kind) -> receptions 0/1/>1
    lost, refused_rx = [], []
    dups = {"reliable": [], "simple": []}
    for m in MSGS.values():
        n = len(by_key.get(m.key, []))
        kind = kinds[m.to]
        oc = m.outcome or "none"
        table[(oc, kind)][min(n, 2)] += 1
        if n > 1:
            dups[kind].append(m)
        if oc in ("queued", "delivered") and n == 0:
            lost.append(m)
        elif oc.startswith("error:") and oc not in MAYBE_STORED and n > 0:
            refused_rx.append(m)

    # a receiver's seqs must rise; for a reliable one, a repeat or a step back is a failure
    order_viol = {}
    for r in receivers:
        v = []
        prev = None
        for x in r.receptions:
            s = x["seq"]
            if not isinstance(s, int):
                continue
            if prev is not None and s <= prev[0]:
                v.append((prev, (s, x)))
            else:
                prev = (s, x)
        order_viol[r.name] = v

    def by_outcome(ms):
        return dict(collections.Counter(m.outcome or "none" for m in ms))

    P(f"binary {args.bin}  commit {commit}  seed {args.seed}  duration {args.duration}s  "
      f"hard={args.hard}")
    P(f"messages sent: {len(MSGS)}")
    P("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))
    P("")
    P("receptions per message (0 / 1 / >1), by sender outcome and receiver kind:")
    for (oc, kind), c in sorted(table.items()):
        P(f"  {oc:28s} {kind:8s}  0:{c[0]:5d}  1:{c[1]:5d}  >1:{c[2]:4d}")
    P("")
    P(f"LOST (queued/delivered, received 0 times): {len(lost)} "
      f"{dict(collections.Counter(kinds[m.to] for m in lost))}")
    P(f"RECEIVED BUT SENDER TOLD A DEFINITE ERROR: {len(refused_rx)} {by_outcome(refused_rx)}")
    P(f"DUPLICATED to a reliable receiver: {len(dups['reliable'])} {by_outcome(dups['reliable'])}")
    P(f"duplicated to a simple receiver (not a failure): {len(dups['simple'])} "
      f"{by_outcome(dups['simple'])}")
    P(f"received by the wrong user: {len(wrong)}; unknown bodies: {len(unknown_body)}")
    for r in receivers:
        P(f"order violations {r.name} ({kinds[r.name]}): {len(order_viol[r.name])}")
    P(f"nodes that exited by themselves: {len(cluster.crashes)} {cluster.crashes}")
    P("")
    for r in receivers:
        P(f"{r.name} ({kinds[r.name]}): sessions={len(r.sessions)} receptions={len(r.receptions)} "
          f"last_seq={r.last_seq} refusals={dict(r.refusals)} final_done={r.final_done}")
    for s in senders:
        P(f"{s.name}: sessions={len(s.sessions)} sent={s.n} stray={len(s.stray)}")

    # receipts without a ref (or for nothing outstanding), matched by id afterwards
    stray_kinds = collections.Counter()
    stray_examples = []
    for s in senders:
        for t, m in s.stray:
            key = ID_TO_KEY.get(m.get("id"))
            if key is None:
                stray_kinds[("no-such-id", m.get("type"), m.get("status") or m.get("code"))] += 1
                if len(stray_examples) < 5:
                    stray_examples.append((s.name, t, m, None))
                continue
            msg = MSGS[key]
            when = "before-ref-receipt" if msg.t_outcome is None or t <= msg.t_outcome else "after"
            stray_kinds[(when, m.get("status"), "ref-outcome=" + str(msg.outcome))] += 1
            if when == "before-ref-receipt" and len(stray_examples) < 5:
                stray_examples.append((s.name, t, m, key))
    P("receipts without ref: " + "; ".join(f"{k}={v}" for k, v in sorted(stray_kinds.items())))
    for name, t, m, key in stray_examples:
        P(f"  e.g. {name} t={t} {m} -> {key and {k: getattr(MSGS[key], k) for k in Msg.__slots__}}")

    def around(t, w=6):
        return [e for e in EVENTS if t - w <= e[0] <= t + w]

    def detail(m):
        d = [f"  {m.key} to={m.to} id={m.id} sent t={m.t_sent} via node{m.node} outcome={m.outcome} "
             f"at t={m.t_outcome} later={m.later}"]
        for name, x in by_key.get(m.key, []):
            d.append(f"    received by {name}: {x}")
        d.append(f"    chaos around send: {around(m.t_sent)}")
        rcv = next(r for r in receivers if r.name == m.to)
        ss = [s for s in rcv.sessions if s["t1"] >= m.t_sent - 1 and s["t0"] <= (m.t_outcome or m.t_sent) + 8]
        d.append(f"    receiver sessions around: {ss}")
        return d

    P("")
    for title, group in (("LOST", lost), ("RECEIVED-BUT-REFUSED", refused_rx),
                         ("DUPLICATED-RELIABLE", dups["reliable"]),
                         ("DUPLICATED-SIMPLE (not a failure)", dups["simple"])):
        if group:
            P(f"== {title} examples (up to 15 of {len(group)}) ==")
            for m in group[:15]:
                lines.extend(detail(m))
    for name, x in (wrong + unknown_body)[:15]:
        P(f"== wrong user / unknown body: {name} got {x}")
    for r in receivers:
        if order_viol[r.name]:
            P(f"== order violations {r.name} (up to 10) ==")
            for a, b in order_viol[r.name][:10]:
                P(f"  after seq {a[0]} {a[1]} came seq {b[0]} {b[1]}")
    P("")
    P("chaos events:")
    for e in EVENTS:
        if e[1] in ("chaos", "node_killed", "redis_killed", "node_up", "redis_up", "node_crashed"):
            P(f"  {e}")
    report = "\n".join(lines)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(report + "\n")
    raw = {
        "msgs": {k: {"to": m.to, "sender": m.sender, "t_sent": m.t_sent, "node": m.node,
                     "outcome": m.outcome, "t_outcome": m.t_outcome, "id": m.id, "later": m.later}
                 for k, m in MSGS.items()},
        "receivers": {r.name: {"reliable": r.reliable, "receptions": r.receptions,
                               "sessions": r.sessions} for r in receivers},
        "senders": {s.name: {"sessions": s.sessions, "stray": s.stray} for s in senders},
        "events": EVENTS,
    }
    with open(os.path.join(out_dir, "raw.json"), "w") as f:
        json.dump(raw, f)
    print(report)
    return {
        "sent": len(MSGS),
        "lost": len(lost),
        "refused_received": len(refused_rx),
        "reliable_dups": len(dups["reliable"]),
        "reliable_order_violations": sum(len(v) for n, v in order_viol.items()
                                         if kinds[n] == "reliable"),
        "wrong_user": len(wrong) + len(unknown_body),
        # counted, not failures
        "simple_dups": len(dups["simple"]),
        "simple_order_violations": sum(len(v) for n, v in order_viol.items()
                                       if kinds[n] == "simple"),
        "crashes": len(cluster.crashes),
    }


FAILURES = ("lost", "refused_received", "reliable_dups", "reliable_order_violations", "wrong_user")

# --hard: more traffic, more frequent kills, shorter downtimes (flags given explicitly win)
HARD = {"duration": 70, "senders": 4, "window": 16, "send_gap": "0.005,0.02",
        "chaos_pause": "0.5,2.5", "downtime": "0.1,2"}
DEFAULTS = {"duration": 60, "senders": 3, "window": 8, "send_gap": "0.02,0.06",
            "chaos_pause": "1.5,5", "downtime": "0.3,3"}


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR")  # relative to the working dir, as for cargo
    target = os.path.abspath(target) if target else os.path.join(REPO, "target")
    return os.path.join(target, "release", "wschat")


def repo_head():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def pair(text):
    lo, hi = map(float, text.split(","))
    return lo, hi


def main():
    ap = argparse.ArgumentParser(
        description="Chaos checker for wschat --cluster (see the module docstring).",
        epilog="example: python3 tests/chaos/chaos.py --seed 4 --hard")
    ap.add_argument("--bin", default=default_bin(),
                    help="wschat binary under test (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hard", action="store_true",
                    help="harder scenario: " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                        for k, v in HARD.items()))
    ap.add_argument("--duration", type=float, help="seconds of traffic and chaos (60; hard 70)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--senders", type=int, help="sending users (3; hard 4)")
    ap.add_argument("--reliable", type=int, default=2, help="reliable receivers (default 2)")
    ap.add_argument("--simple", type=int, default=2, help="simple receivers (default 2)")
    ap.add_argument("--window", type=int, help="unanswered privates per sender (8; hard 16)")
    ap.add_argument("--lease", default="2s", help="--cluster-lease of the nodes (default 2s)")
    ap.add_argument("--send-gap", help="seconds between a sender's privates, min,max "
                                       "(0.02,0.06; hard 0.005,0.02)")
    ap.add_argument("--chaos-pause", help="seconds between chaos actions, min,max "
                                          "(1.5,5; hard 0.5,2.5)")
    ap.add_argument("--downtime", help="seconds a killed process stays down, min,max "
                                       "(0.3,3; hard 0.1,2)")
    ap.add_argument("--no-chaos", action="store_true", help="traffic only, nothing killed")
    ap.add_argument("--out", help="output dir (default: a fresh temp dir)")
    ap.add_argument("--commit", help="label for the report (default: this repository's HEAD, "
                                     "not checked against the binary)")
    ap.add_argument("--keep", action="store_true", help="keep the nodes' and Redis's data dirs")
    ap.add_argument("extra", nargs="*", help="extra wschat flags (after --)")
    args = ap.parse_args()
    for k, v in (HARD if args.hard else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    if not os.access(args.bin, os.X_OK):
        sys.exit(f"no wschat binary at {args.bin}: run `cargo build --release` or pass --bin")
    if shutil.which("redis-server") is None:
        sys.exit("no redis-server on PATH")
    commit = args.commit or repo_head()
    if args.out:
        out_dir = os.path.abspath(args.out)
        os.makedirs(out_dir, exist_ok=True)
    else:
        out_dir = tempfile.mkdtemp(prefix=f"wschat-chaos-seed{args.seed}-")
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="wschat-chaos-data-")
    cluster = Cluster(args.bin, workdir, args.nodes, args.lease, args.extra)
    event("setup", f"workdir={workdir} out={out_dir} redis={cluster.redis_port} nodes={cluster.ports}")
    result = None
    try:
        cluster.start_redis()
        for i in range(args.nodes):
            cluster.start_node(i)
        names_r = [f"r{i}" for i in range(args.reliable)]
        names_p = [f"p{i}" for i in range(args.simple)]
        receivers = [Receiver(n, True, cluster, rng.random(), (0.5, 2.0)) for n in names_r] + \
                    [Receiver(n, False, cluster, rng.random(), (0.5, 2.0)) for n in names_p]
        for r in receivers:
            r.start()
        for r in receivers:
            r.welcomed.wait(15)
        senders = [Sender(f"s{i}", cluster, names_r + names_p, rng.random(), args.window,
                          pair(args.send_gap)) for i in range(args.senders)]
        for s in senders:
            s.start()
        event("traffic", "started")
        if args.no_chaos:
            time.sleep(args.duration)
        else:
            chaos(cluster, rng, args.duration, pair(args.downtime), pair(args.chaos_pause))
        # everything up again
        if cluster.redis.poll() is not None:
            cluster.start_redis()
        for i, p in enumerate(cluster.procs):
            cluster.check_alive(i)
            if p.poll() is not None:
                cluster.start_node(i)
        SEND_DONE_BY[0] = time.time() + 9
        STOP_SEND.set()
        event("traffic", "senders stopping; waiting for outcomes")
        for s in senders:
            s.join(15)
        time.sleep(1)
        STOP_HOP.set()
        event("traffic", "receivers stop hopping; final drain")
        for r in receivers:
            r.join(60)
        event("done", "")
        for i in range(args.nodes):
            cluster.check_alive(i)
        result = analyse(receivers, senders, cluster, out_dir, args, commit)
    except RuntimeError as e:  # a process that would not start
        event("aborted", str(e))
    finally:
        cluster.stop_all()
        for i in range(args.nodes):
            src = os.path.join(workdir, f"node{i}.log")
            if os.path.exists(src):
                shutil.copy(src, out_dir)
        if os.path.exists(os.path.join(workdir, "redis.log")):
            shutil.copy(os.path.join(workdir, "redis.log"), out_dir)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if result is None:
        print(f"RESULT seed={args.seed} aborted (logs in {out_dir})")
        sys.exit(2)
    failed = [k for k in FAILURES if result[k]]
    print(f"RESULT seed={args.seed} hard={args.hard} " +
          " ".join(f"{k}={v}" for k, v in result.items()) +
          f" -> {'FAIL (' + ', '.join(failed) + ')' if failed else 'ok'}  report: {out_dir}/report.txt")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

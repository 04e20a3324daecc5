#!/usr/bin/env python3
"""Summarise an Autobahn|Testsuite fuzzingclient report (reports/servers/index.json).

Prints counts per behavior, then every FAILED / NON-STRICT case (or one whose
closing behavior is anything but OK / INFORMATIONAL) with its description and the suite's
reason. Exit status 1 if any case FAILED, cases are missing, the suite did not
finish or the server died; 0 otherwise.
"""
import argparse
import json
import os
import re
import sys
import textwrap

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]


def case_key(cid):
    return tuple(int(x) for x in cid.split("."))


def wrap(label, text, width=100):
    text = " ".join(re.sub(r"</?[a-zA-Z][^>]*>", "", str(text)).split())
    return textwrap.fill(text, width=width, initial_indent="      %s: " % label,
                         subsequent_indent="      " + " " * (len(label) + 2))


def fmt_events(events, limit=6):
    """Compact rendering of the suite's event lists: [['message', payload, binary], ['pong', payload], ...]."""
    out = []
    for ev in events[:limit]:
        if isinstance(ev, (list, tuple)) and ev:
            kind = str(ev[0])
            if len(ev) > 1 and isinstance(ev[1], str):
                pl = ev[1]
                pl = repr(pl) if len(pl) <= 24 else "<%d chars>" % len(pl)
                kind += "(" + pl + (", binary" if len(ev) > 2 and ev[2] else "") + ")"
            out.append(kind)
        else:
            out.append(str(ev))
    if len(events) > limit:
        out.append("... %d more" % (len(events) - limit))
    return "[" + ", ".join(out) + "]"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", required=True, help="directory holding index.json")
    ap.add_argument("--wstest-log")
    ap.add_argument("--wstest-rc", type=int, default=0)
    ap.add_argument("--server-status", default="running")
    ap.add_argument("--server-log")
    a = ap.parse_args()

    problems = []
    expected = None
    if a.wstest_log and os.path.exists(a.wstest_log):
        m = re.search(r"Ok, will run (\d+) test cases", open(a.wstest_log, errors="replace").read())
        if m:
            expected = int(m.group(1))
    if a.wstest_rc != 0:
        problems.append("wstest exited with status %d (124 = time limit hit)" % a.wstest_rc)
    if a.server_status != "running":
        problems.append("server %s" % a.server_status)

    index_path = os.path.join(a.report, "index.json")
    if not os.path.exists(index_path):
        print("== Autobahn summary: NO REPORT (%s missing)" % index_path)
        for p in problems:
            print("   problem: " + p)
        if a.wstest_log and os.path.exists(a.wstest_log):
            print("   last lines of %s:" % a.wstest_log)
            for line in open(a.wstest_log, errors="replace").read().splitlines()[-20:]:
                print("      " + line)
        return 1

    index = json.load(open(index_path))
    rc = 0
    for agent, cases in sorted(index.items()):
        ids = sorted(cases, key=case_key)
        counts = {b: 0 for b in BEHAVIORS}
        close_counts = {}
        for cid in ids:
            b = cases[cid]["behavior"]
            counts[b] = counts.get(b, 0) + 1
            bc = cases[cid]["behaviorClose"]
            close_counts[bc] = close_counts.get(bc, 0) + 1
        # a case cut short by a dead server can report an epoch-sized duration: ignore those
        total_ms = sum(d for d in (cases[c].get("duration") or 0 for c in ids) if d < 10**8)

        print("== Autobahn fuzzingclient summary for agent %r: %d cases (suite time %.1fs)"
              % (agent, len(ids), total_ms / 1000.0))
        print("   behavior:       " + "  ".join("%s=%d" % (b, n) for b, n in counts.items()))
        print("   closing behav.: " + "  ".join("%s=%d" % kv for kv in sorted(close_counts.items())))
        if expected is not None and len(ids) != expected:
            problems.append("only %d of %d cases have a result (connection refused? server died?)"
                            % (len(ids), expected))

        bad = [c for c in ids
               if cases[c]["behavior"] in ("FAILED", "NON-STRICT")
               or cases[c]["behaviorClose"] not in ("OK", "INFORMATIONAL")]
        # A closing behaviour other than OK/INFORMATIONAL (FAILED, WRONG CODE,
        # UNCLEAN...) fails the run too: the close code is part of conformance.
        if counts.get("FAILED", 0) or any(
                cases[c]["behaviorClose"] not in ("OK", "INFORMATIONAL") for c in ids):
            rc = 1
        if bad:
            print("   FAILED / NON-STRICT cases:")
        for cid in bad:
            e = cases[cid]
            detail = {}
            try:
                detail = json.load(open(os.path.join(a.report, e["reportfile"])))
            except (OSError, ValueError):
                pass
            print("   - %s  behavior=%s  close=%s  remoteCloseCode=%s  duration=%sms"
                  % (cid, e["behavior"], e["behaviorClose"], e.get("remoteCloseCode"),
                     e.get("duration")))
            if detail:
                print(wrap("description", detail.get("description", "")))
                print(wrap("expectation", detail.get("expectation", "")))
                print(wrap("result", detail.get("result", "")))
                print(wrap("resultClose", detail.get("resultClose", "")))
                exp = detail.get("expected") or {}
                if exp:
                    print(wrap("expected", "; ".join("%s: %s" % (k, fmt_events(v))
                                                     for k, v in sorted(exp.items()))))
                    print(wrap("received", fmt_events(detail.get("received") or [])))
                ec = detail.get("expectedClose") or {}
                if ec:
                    print(wrap("expectedClose", "closeCode in %s, requireClean=%s"
                               % (ec.get("closeCode"), ec.get("requireClean"))))
                extra = []
                for k in ("wasClean", "wasNotCleanReason", "droppedByMe", "failedByMe",
                          "wasServerConnectionDropTimeout", "wasOpenHandshakeTimeout",
                          "wasCloseHandshakeTimeout", "localCloseCode", "localCloseReason",
                          "remoteCloseReason"):
                    if k in detail and detail[k] not in (None, False, ""):
                        extra.append("%s=%s" % (k, detail[k]))
                if extra:
                    print(wrap("details", ", ".join(extra)))
            print("      report: %s" % os.path.join(a.report, e["reportfile"].replace(".json", ".html")))

    if problems:
        rc = 1
        for p in problems:
            print("   problem: " + p)
        if a.server_log and os.path.exists(a.server_log):
            tail = open(a.server_log, errors="replace").read().splitlines()[-15:]
            if tail:
                print("   last lines of server stderr (%s):" % a.server_log)
                for line in tail:
                    print("      " + line)
    print("== RESULT: %s" % ("FAIL" if rc else "PASS"))
    return rc


if __name__ == "__main__":
    sys.exit(main())

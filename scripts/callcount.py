#!/usr/bin/env python3
"""The table of scripts/callcount: instructions per call from its callgrind files (DIR)."""
import re
import sys


def entry(path, fn):
    """(inclusive instructions, calls) of the C entry point `fn`, as called from outside it."""
    names, cost, calls, cur, cfn, pending = {}, 0, 0, None, None, False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if pending:
                # The line after calls=: the call's position, then its inclusive cost.
                cost += int(line.split()[-1])
                pending = False
                continue
            m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line)
            if m:
                kind, i, name = m.groups()
                if name:
                    names[i] = name
                if kind == "fn":
                    cur = i
                else:
                    cfn = i
                continue
            m = re.match(r"^calls=(\d+)", line)
            if m and names.get(cfn) == fn and names.get(cur) != fn:
                calls += int(m.group(1))
                pending = True
    return cost, calls


def load(path, fn):
    try:
        return entry(path, fn)
    except (OSError, ValueError, IndexError):
        return None


def main(out):
    rows = []
    for lib, b in (("rsocket-rs", "rsbench"), ("librdmacm", "rsbench-rdmacm")):
        few = load("%s/calls1000.%s" % (out, b), "rrecv")
        many = load("%s/calls21000.%s" % (out, b), "rrecv")
        send = load("%s/calls1000.%s" % (out, b), "rsend")
        b2b_send = load("%s/b2b.%s" % (out, lib), "rsend")
        b2b_recv = load("%s/b2b.%s" % (out, lib), "rrecv")
        got = (few, many, send, b2b_send, b2b_recv)
        if None in got or many[1] <= few[1] or any(g[1] == 0 for g in got):
            print("callcount: %s: a run failed (its files are in %s)" % (lib, out))
            continue
        miss = (many[0] - few[0]) / (many[1] - few[1])
        hit = (few[0] - 1000 * miss) / (few[1] - 1000)
        rows.append((lib, miss, send[0] / send[1], hit,
                     b2b_send[0] / b2b_send[1], b2b_recv[0] / b2b_recv[1]))
    print("instructions per call (callgrind, Soft-RoCE VM, 64 B)")
    cols = ("idle rrecv", "pp rsend", "pp rrecv", "b2b rsend", "b2b rrecv")
    print("%-11s" % "" + "".join("%12s" % c for c in cols))
    for r in rows:
        print("%-11s" % r[0] + "".join("%12.0f" % x for x in r[1:]))
    if len(rows) == 2:
        print("%-11s" % "ratio" + "".join("%12.2f" % (x / y) for x, y in zip(rows[0][1:], rows[1][1:])))
    return 0 if len(rows) == 2 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

#!/usr/bin/env python3
"""footprint.py: the code a call path touches, from a callgrind profile.

Counts the distinct instruction addresses executed (per object, and per function with -f) in a
callgrind output file written with --dump-instr=yes, keeping only those executed in at least a
fraction of the iterations (the hot path, not setup or rare branches). Under TCG a round trip's
cost grows with the distinct code run between two posts (bench/README.md, "Where a ping-pong's
time goes"): this is the measure of it that does not depend on the run's timing.

  # in the VM: rstream's 64 B ping-pong client, rsocket-rs preloaded, rsend and rrecv only
  LD_PRELOAD=.../librsocket-rs.so.0 valgrind --tool=callgrind --dump-instr=yes \\
      --toggle-collect=rsend --toggle-collect=rrecv --callgrind-out-file=fp.out \\
      rstream -s SERVER -b LOCAL -S 64 -C 1 -I 500
  python3 footprint.py fp.out 500 0.9 [-f]     # 500 iterations, addresses hit in >= 90% of them

A measurement aid, not built or run by make.
"""
import collections
import re
import sys


def number(tok, last):
    """A callgrind position: absolute (0x..), relative (+n, -n) or the same (*)."""
    if tok == "*":
        return last
    sign = 1
    if tok[0] in "+-":
        sign = -1 if tok[0] == "-" else 1
        tok = tok[1:]
        return last + sign * (int(tok, 16) if tok.startswith("0x") else int(tok))
    return int(tok, 16) if tok.startswith("0x") else int(tok)


def parse(path):
    """Per (object, address): the instructions executed there, and the function it is in."""
    cost = collections.Counter()
    func = {}
    names = {"ob": {}, "fn": {}}
    obj, fn, last, npos, after_call = "?", "?", 0, 1, False
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        if line.startswith("positions:"):
            npos = len(line.split()) - 1
            continue
        m = re.match(r"(c?)(ob|fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            call, kind, ident, name = m.groups()
            if name:
                names[kind][ident] = name
            if not call:
                if kind == "ob":
                    obj = names["ob"].get(ident, "?")
                else:
                    fn = names["fn"].get(ident, "?")
            continue
        if line.startswith("calls="):
            after_call = True
            continue
        if not (line[0].isdigit() or line[0] in "+-*"):
            continue
        tok = line.split()
        last = number(tok[0], last)
        if after_call:
            # The line after calls= is the call's inclusive cost, not code run here.
            after_call = False
            continue
        n = int(tok[npos]) if len(tok) > npos else 0
        if n > 0:
            cost[(obj, last)] += n
            func[(obj, last)] = fn
    return cost, func


def main():
    path, iters, share = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    cost, func = parse(path)
    hot = [k for k, n in cost.items() if n >= iters * share]
    per_obj = collections.Counter(o.split("/")[-1] for o, _ in hot)
    print("instructions per iteration %.0f; hot addresses %d" %
          (sum(cost.values()) / iters, len(hot)))
    for o, n in per_obj.most_common():
        print("  %6d %s" % (n, o))
    if "-f" in sys.argv:
        per_fn = collections.Counter(func[k] for k in hot)
        for f, n in per_fn.most_common(40):
            print("    %5d %s" % (n, f[:140]))


if __name__ == "__main__":
    main()

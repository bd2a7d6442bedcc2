"""How often a flow enters each source file of bus-nats: read from a callgrind profile.

    cargo test -p ordered-bus-nats --test batches_nats --no-run
    valgrind --tool=callgrind --callgrind-out-file=/tmp/flow.cg '--toggle-collect=*subscribe_raw*' \
        target/debug/deps/batches_nats-<hash> a_raw_subscription_made_first_provisions_its_topic --exact
    python3 xtask/flow_entries.py /tmp/flow.cg [crates/bus-nats/src/] [-v]

Prints, per file, the entries into it while the toggled function ran (here everything under
`subscribe_raw` on a new bus: connecting, provisioning the stream, the consumer and the
dead-letter stream, taking the ownership, assembling the subscription). An entry is one call
from a function of the crate in one file to a function in another: a distinct (caller, callee)
pair, closures counted as the function they are written in. Glue outside the crate polling a
closure, and clones, comparisons and defaults, are not steps a reader follows. `-v` lists the
calls. A file entered three times is re-entered twice."""
import re, sys, collections
path = sys.argv[1]
src_root = sys.argv[2] if len(sys.argv) > 2 else "crates/bus-nats/src/"
files, fns = {}, {}
def name(table, s):
    m = re.match(r"\((\d+)\)(?: (.*))?", s)
    if not m: return s
    if m.group(2) is not None: table[m.group(1)] = m.group(2)
    return table[m.group(1)]
fl = fi = cfl = None; fn = None; cfn = None
fn_file = {}
edges = set()
pending = None
for line in open(path):
    line = line.rstrip("\n")
    if line.startswith("fl="): fl = fi = name(files, line[3:]); cfl = None
    elif line.startswith(("fi=", "fe=")): fi = name(files, line[3:])
    elif line.startswith("fn="):
        fn = name(fns, line[3:]); fi = fl; fn_file.setdefault(fn, fl)
    elif line.startswith(("cfl=", "cfi=")): cfl = name(files, line[4:])
    elif line.startswith("cfn="):
        cfn = name(fns, line[4:])
    elif line.startswith("calls="):
        callee_file = cfl if cfl is not None else fi
        fn_file.setdefault(cfn, callee_file)
        edges.add((fn, fi, cfn, callee_file))
        cfl = None
def short(f):
    i = f.find(src_root)
    return f[i+len(src_root):] if i >= 0 else None
def root(f):
    f = re.sub(r"'\d+$", "", f)
    while f.endswith("::{{closure}}"): f = f[: -len("::{{closure}}")]
    return f
count = collections.Counter(); sites = collections.defaultdict(set)
for fn, fi, cfn, cf in edges:
    a, b = short(fi or ""), short(cf or "")
    # Calls made by the bus's own code into another of its files; glue outside the crate
    # (Pin::poll, Into, iterator adapters) polling a closure is not a step of the flow.
    if a is None or b is None or a == b: continue
    # Clones, comparisons and defaults (derived, mostly) are not steps a reader follows.
    if re.search(r"as core::(clone::Clone>::clone|cmp::PartialEq>::eq|default::Default>::default)$", root(cfn)): continue
    sites[b].add(f"{a}: {root(fn)[:90]} -> {root(cfn)[:110]}")
for b, s in sites.items(): count[b] = len(s)
for f, n in count.most_common():
    print(f"{n:3} {f}")
    if "-v" in sys.argv:
        for s in sorted(sites[f]): print("      ", s)

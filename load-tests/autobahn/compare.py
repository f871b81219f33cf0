"""Compare Autobahn fuzzing-client results: each router agent (plain, TLS) against the direct
connection.

Exit 1 if any case failed for any agent, or if any case's result (behaviour and close
behaviour) through a router differs from the direct one, unless it is better: the router
checks some frames more strictly than the echo replica does (a Close over 125 bytes), and
such cases are listed, not failed. Prints the counts per agent and the
time the performance cases (9.*) took, when they ran.
"""

import collections
import json
import sys

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
# Lower is better; anything unlisted (FAILED, FAILED BY CLIENT, ...) ranks last.
RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 1, "UNIMPLEMENTED": 2}


def rank(result):
    return RANK.get(result, 3)


def main(path):
    with open(path) as f:
        index = json.load(f)
    direct = index["direct"]
    routers = sorted(agent for agent in index if agent != "direct")
    problems, better = [], []
    for agent in ["direct"] + routers:
        cases = index[agent]
        counts = collections.Counter(case["behavior"] for case in cases.values())
        print(f"{agent:12} {len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for case_id, case in cases.items():
            # `behavior` is the case's verdict; `behaviorClose` alone may read FAILED where the
            # case expects the connection to be failed.
            if case["behavior"] not in PASSING:
                problems.append(f"{agent} {case_id}: {case['behavior']}")
    for agent in routers:
        router = index[agent]
        for case_id in sorted(set(direct) | set(router), key=case_key):
            if case_id not in direct or case_id not in router:
                problems.append(f"{case_id}: ran for one of direct and {agent} only")
                continue
            want = (direct[case_id]["behavior"], direct[case_id]["behaviorClose"])
            got = (router[case_id]["behavior"], router[case_id]["behaviorClose"])
            if want != got:
                line = f"{case_id}: direct {want}, {agent} {got}"
                if all(rank(g) <= rank(w) for g, w in zip(got, want)):
                    better.append(line)
                else:
                    problems.append(line)
    perf = [c for c in direct if c.startswith("9.")]
    if perf:
        took = {a: sum(index[a][c]["duration"] for c in perf) for a in ["direct"] + routers}
        print("9.* performance cases: " + ", ".join(
            f"{a} {took[a]} ms ({took[a] / max(took['direct'], 1):.2f}x)" for a in ["direct"] + routers))
    if better:
        print("\n".join(["better through the router than direct:"] + better))
    if problems:
        print("\n".join(["MISMATCH or FAILED:"] + problems))
        return 1
    print(f"every case through {' and '.join(routers)} matches direct or does better, 0 failed")
    return 0


def case_key(case_id):
    return tuple(int(part) for part in case_id.split("."))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

#!/usr/bin/env python3
"""Fan-out: prepare a sandbox once, BRANCH it into 4, try a different fix in each, keep the best.

    pip install ./sdk/python
    forkd daemon &            # or point FORKD_SOCKET at a running daemon
    python3 examples/fanout.py
"""

import time

import forkd

BUGGY = """
def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
"""

# Defined once in the source's interpreter; every child inherits it (and anything imported).
HARNESS = """
def run_tests(median):
    failures = []
    for xs, want in [([3, 1, 2], 2), ([4, 1, 3, 2], 2.5), ([7], 7)]:
        got = median(xs)
        if got != want:
            failures.append(f"median({xs}) = {got}, want {want}")
    return failures
"""

CANDIDATES = {
    "average the middle pair": """
def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
""",
    "use statistics": "from statistics import median\n",
    "off by one": """
def median(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2]
""",
    "leave it": BUGGY,
}


def main() -> None:
    with forkd.Sandbox.create(image="default") as sb:
        # Prepare once: the code under test, the test harness, a warm interpreter.
        sb.files.write("/work/solution.py", BUGGY)
        sb.eval(HARNESS)
        sb.eval(BUGGY)
        print("before:", sb.eval("run_tests(median)").value)

        start = time.monotonic()
        kids = sb.branch(len(CANDIDATES))
        print(f"branched into {len(kids)} in {(time.monotonic() - start) * 1000:.0f} ms "
              f"(source paused {kids.pause_ms:.2f} ms)")

        results = {}
        for kid, (name, code) in zip(kids, CANDIDATES.items()):
            kid.files.write("/work/solution.py", code)
            kid.eval(code)
            results[name] = kid.eval("run_tests(median)").json
        for name, failures in results.items():
            print(f"  {name:26} {'pass' if failures == '[]' else failures}")

        winner = next((name for name, failures in results.items() if failures == "[]"), None)
        print("winner:", winner)
        # The source never saw any of it.
        assert sb.files.read_text("/work/solution.py") == BUGGY
        for kid in kids:
            kid.kill()


if __name__ == "__main__":
    main()

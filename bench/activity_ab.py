"""A/B: the cost of one written decide() (every call moves the idle clock), for issue 8's activity statistics.

Run it once with PYTHONPATH pointing at an older checkout's src/ and once without; compare."""
import timeit

from lapse.core.decide import Request, decide, sign_in
from lapse.core.policy import Layer, PolicySpec, compile_policy

p = compile_policy(PolicySpec(defaults=Layer({"idle": 1800.0, "absolute": 43200.0})))
eff = p.resolve("x.test", "/api/x", "GET", "192.0.2.1", False)
s = sign_in("ab" * 16, "alice", 1e9, eff.limits, ip="192.0.2.1").session
r = Request("GET", "/api/x", "192.0.2.1", "ab" * 16)
state = [s, 1e9]
def step():
    state[1] += 2.0  # every call writes (activity moved by more than the coalescing bound)
    d = decide(state[0], r, eff, state[1])
    state[0] = d.session
n = 200000
print(min(timeit.repeat(step, number=n, repeat=5)) / n * 1e6, "us per written decide()")

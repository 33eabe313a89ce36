"""Test infrastructure, used by `pycpt demo`, the tests and the benchmarks: pretend hosts
on this kernel (testhosts) and the demo's workload (demo_workload). Not part of pycpt's
API."""

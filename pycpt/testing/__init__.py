"""Test infrastructure, used by `pycpt demo`, the tests and the benchmarks: pretend hosts
on this kernel (testhosts), the demo's workload (demo_workload) and CRIU's python3-pycriu
fetched for comparison (pycriu). Not part of pycpt's API."""

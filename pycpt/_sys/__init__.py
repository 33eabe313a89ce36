"""Host helpers: what /proc says (procfs), pycpt's state directory, locks and JSON files
(state)."""

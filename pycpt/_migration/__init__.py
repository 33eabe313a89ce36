"""Internals of `pycpt migrate`: the messages between the two sides (channel), the ssh
connection (ssh) and the target's half (target, the `pycpt migrate-target` verb). The
public face is pycpt.migrate."""

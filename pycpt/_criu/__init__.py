"""Internals of pycpt's CRIU client: one `criu swrk` (swrk), CRIU's RPC messages
(rpc_schema), keyword options (options), CRIU's log (log), its kernel-probe cache (kdat) and
the image streamer (streamer). The public face is pycpt.criu."""

"""ZeroMQ backend: runs a scenario for real, one process per device.

Stage workers hold slices of a HF transformers causal LM with a prunable KV cache; the draft node
holds the draft model and the LM head. Here live the wire format, the launcher (local loopback or a
testbed), link shaping and the device profiler. The shared scheduling core in `flowspec/` makes
every decision; this package only carries its commands out on real hardware. It never imports `sim`.
"""

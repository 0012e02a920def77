"""Attribution methods: one small class per method that attributes a prediction to input tokens.

Layer: beside ``probes`` and ``edits`` (may import ``engine``, ``corpus``, ``models``);
never imported by the engine. See docs/architecture.md.
"""

"""KV-cache presses: one small class per method that scores cached keys and frees the ones it drops.

Layer: beside ``probes`` and ``edits`` (may import ``engine``, ``corpus``, ``models``, ``atlas``);
never imported by the engine. See docs/architecture.md.
"""

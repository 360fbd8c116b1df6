"""The pure core: no I/O, no clock, no randomness (they come in as arguments).

Config (YAML -> specs, every error located), the compiled table, routing decisions, sticky
hashing, HTTP/1.1 head rules, health and ejection rules, counters, rollout statistics and the
rollout state machine, JSON comparison and WebSocket close frames. tests/unit/test_core_imports.py
walks this folder and fails on a forbidden import.
"""

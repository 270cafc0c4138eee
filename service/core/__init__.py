"""The transport-agnostic core: sessions, hub, router, presence and backplane contracts and
their in-process twins.  Imports neither sanic nor redis (tests/core/test_isolation.py)."""

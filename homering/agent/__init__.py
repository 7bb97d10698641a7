"""The agent: one device of the ring (see :mod:`homering.agent.agent`, the supervisor, and ARCHITECTURE.md)."""

"""Fault-injection soak: daemons, a broker and the API emulator behind fault proxies, a seeded schedule of
kills and link faults, poison input, and a tally of what survived (`python -m tests.chaos --seed N`)."""

__all__: list[str] = []

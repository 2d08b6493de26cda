"""Both sides of the CloudZero allocation telemetry API: the shared record rules, the client, the emulator."""

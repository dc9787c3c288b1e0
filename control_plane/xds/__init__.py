"""The xDS protocol core of the ADS server: pure per-stream bookkeeping, no sockets, no asyncio."""

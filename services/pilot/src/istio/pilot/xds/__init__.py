"""xDS generation: pure functions of (MeshSnapshot, Proxy) -> Resources. No I/O, no asyncio."""

"""Talking to Mixer: the wire codec for attribute bags (`attributes`) and a client with a Check
cache, Report batching and quota prefetch over a transport the caller provides (`client`)."""

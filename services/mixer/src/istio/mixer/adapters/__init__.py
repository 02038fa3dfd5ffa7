"""Mixer's built-in adapters, each an AdapterInfo named INFO, registered as entry points in
`istio.mixer.adapters` by this distribution (custom adapters register the same way)."""

"""Shared fixtures for the proxy's tests."""

"""Mixer: attribute-based Check and Report, with templates, adapters and quotas (`mixs`)."""

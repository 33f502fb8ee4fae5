"""Tiers under the prefix cache: KV blocks evicted from the pages live on in RAM, then on disk, named by their hash."""

"""API keys with names and policies: the keys file, the ring the front ends check, and the limits the core enforces."""

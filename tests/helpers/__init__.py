"""What the tests share: tiny models, the local Hub server, the DDP worker script, a reference LSQ."""

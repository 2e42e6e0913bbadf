"""Client SDK for the Triton reward server."""

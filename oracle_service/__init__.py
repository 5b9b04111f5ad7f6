"""The oracle worker: the large model that verifies draft blocks and decides every token."""

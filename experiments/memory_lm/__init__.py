"""The memory experiment: claims 1 (domain banks) and 2 (session memory) on real text."""

"""Tests against the world outside one job: chaos (damaged files, killed ranks), fuzzed inputs, clusters, images."""

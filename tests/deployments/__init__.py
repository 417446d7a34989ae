"""Tests of the Ray Serve layer (deployments/)."""

"""Loaded by Python at start-up when this folder is on PYTHONPATH: `ssae_ray.testing.driver_audit`."""

from ssae_ray.testing.driver_audit import install

install()

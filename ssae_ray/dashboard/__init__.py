"""The feature dashboard: a static HTML site per sweep (feature index, a page per feature, the
GSAE -> SSAE diff) and a Neuronpedia export, from one streaming LM pass (`ssae_ray.collect`)
shared with auto-interp's example scan.

`build_dashboard` (any SAEs) and `build_sweep_dashboard` (a sweep's GSAE and matched-L0 SSAEs)
are the entry points; `ssae-ray dashboard` and the physics job's dashboard stage call the latter.
"""

from ssae_ray.dashboard.build import build_dashboard, scan_contexts
from ssae_ray.dashboard.data import SAESpec
from ssae_ray.dashboard.sweep import build_sweep_dashboard, log_dashboard

__all__ = ["SAESpec", "build_dashboard", "build_sweep_dashboard", "log_dashboard", "scan_contexts"]

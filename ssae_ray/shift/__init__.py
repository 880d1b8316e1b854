"""SHIFT on Bias in Bios (section 3.1.3, appendices G and H): data, probe, attribution, Table 1."""

from ssae_ray.shift.data import BiosData, DataError, load_bios
from ssae_ray.shift.shift import ShiftResult, run_shift
from ssae_ray.shift.table import log_mlflow, write_outputs

__all__ = ["BiosData", "DataError", "ShiftResult", "load_bios", "log_mlflow", "run_shift", "write_outputs"]

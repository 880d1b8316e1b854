"""What a driver process loaded: proof that the head only drives.

Put the folder of `audit_site/` on the driver's PYTHONPATH (only the driver's: Ray starts its
workers with the raylet's environment) and name a report file:

    ray job submit --working-dir . -- env PYTHONPATH=<site> SSAE_RAY_DRIVER_AUDIT=/shared/audit.json \\
        python jobs/physics.py ...

`sitecustomize` then calls `install()` before the job's first line. It records, without changing
behaviour:

- every `torch.nn.Parameter` created in this process (count, elements, shapes): an LM or an SAE
  built or loaded here creates its parameters here;
- every call of the weight loaders (`safetensors.safe_open` / `load_file` / `load`, `torch.load`),
  with its argument;
- every file opened through Python whose name is a weight file (`.safetensors`, `.bin`, `.pt`,
  `.pth`, `.gguf`, `.ckpt`);

and writes them to `SSAE_RAY_DRIVER_AUDIT` (JSON) at exit, with this process's PID and host.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
ENV = "SSAE_RAY_DRIVER_AUDIT"

REPORT: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                          "parameters": 0, "parameter_elements": 0, "parameter_shapes": [],
                          "loader_calls": [], "weight_files_opened": []}  # fmt: skip


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes):
        name = os.fsdecode(args[0])
        if name.endswith(WEIGHT_SUFFIXES) and len(REPORT["weight_files_opened"]) < 200:
            REPORT["weight_files_opened"].append(name)


def _wrap(owner: Any, attr: str, label: str) -> None:
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_ssae_audited", False):
        return

    def wrapped(*a: Any, **k: Any) -> Any:
        # a file (a path); in-memory buffers are Ray deserialising data (tensors of a test set), not weights
        if a and isinstance(a[0], str | os.PathLike):
            REPORT["loader_calls"].append(f"{label}({str(a[0])[:200]})")
        return fn(*a, **k)

    wrapped._ssae_audited = True  # type: ignore[attr-defined]
    try:
        setattr(owner, attr, wrapped)
    except (AttributeError, TypeError):
        pass


def install() -> None:
    out = os.environ.get(ENV)
    if not out:
        return
    sys.addaudithook(_audit)
    import torch

    orig_new = torch.nn.Parameter.__new__

    def param_new(cls: Any, data: Any = None, requires_grad: bool = True) -> Any:
        p = orig_new(cls, data, requires_grad)
        REPORT["parameters"] += 1
        REPORT["parameter_elements"] += int(p.numel())
        if len(REPORT["parameter_shapes"]) < 50:
            REPORT["parameter_shapes"].append(list(p.shape))
        return p

    torch.nn.Parameter.__new__ = staticmethod(param_new)  # type: ignore[method-assign]
    _wrap(torch, "load", "torch.load")
    try:
        import safetensors
        import safetensors.torch

        _wrap(safetensors, "safe_open", "safetensors.safe_open")
        _wrap(safetensors.torch, "load_file", "safetensors.torch.load_file")
        _wrap(safetensors.torch, "load", "safetensors.torch.load")
    except ImportError:
        pass

    def write() -> None:
        tmp = f"{out}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(REPORT, f, indent=1)
        os.replace(tmp, out)

    atexit.register(write)

"""Process set-up shared by the CLI, the jobs and the tests: logging and joining / starting Ray."""

from __future__ import annotations

import logging
import os
import re
import warnings

from ssae_ray.config import RayConfig

log = logging.getLogger("ssae_ray")

_SECRET = re.compile(r"(sk-ant-[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]+")


class _Redact(logging.Filter):
    """Belt and braces: no log record ever carries an Anthropic API key."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "sk-ant-" in msg:
            record.msg = _SECRET.sub(r"\1…[redacted]", msg)
            record.args = ()
        return True


def setup_logging(level: int = logging.INFO) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = logging.getLogger()
    if not any(isinstance(f, _Redact) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(_Redact())
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(level)
    for noisy in ("transformers", "sentence_transformers", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="sae_lens")
    warnings.filterwarnings("ignore", category=FutureWarning)


def init_ray(cfg: RayConfig):
    """Join the cluster named by `RAY_ADDRESS` / `cfg.address` (as under `ray job submit`), or start
    a local one with `cfg.num_cpus` CPUs and a capped object store."""
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_mb * 1024**2,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    return ray

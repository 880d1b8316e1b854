"""The physics SSAE job: corpus -> index -> retrieve -> finetune sweep -> eval -> report.

    python jobs/physics.py                                  # the offline `local` preset
    python jobs/physics.py --preset tiny workdir=/tmp/x     # any preset, any override
    ray job submit --working-dir . -- python jobs/physics.py --preset paper-physics

The job holds no logic: it is `ssae-ray physics`. Every stage is cached by a content hash of
its inputs, so a rerun skips what is done and resumes what was interrupted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a Ray working dir

from ssae_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["physics", *sys.argv[1:]]))

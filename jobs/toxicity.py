"""The toxicity SSAE job (the paper's appendix C): the physics pipeline on the `paper-toxicity`
preset: OpenWebText -> a 4,072-token Pile-toxicity seed -> 5.25M retrieved tokens -> 500-step
finetunes of gemma-2b-res-jb (8 lambdas x 3 seeds x 5 strategies, TERM on dense) -> the 3.357M-token
toxicity test set -> report.

    python jobs/toxicity.py                                   # the paper-toxicity preset
    python jobs/toxicity.py workdir=/tmp/tox eval.test_tokens=20000   # any override
    ray job submit --working-dir . -- python jobs/toxicity.py

The job holds no logic: it is `ssae-ray physics --preset paper-toxicity` (a later `--preset` wins).
Every stage is cached by a content hash of its inputs, so a rerun skips what is done.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a Ray working dir

from ssae_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["physics", "--preset", "paper-toxicity", *sys.argv[1:]]))

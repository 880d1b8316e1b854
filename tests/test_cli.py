import subprocess
import sys

from ssae_ray.cli import STAGES, main


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "ssae_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--preset", "tiny", "train.lam=4.5"]) == 0
    assert "lam: 4.5" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_clear_line(capsys):
    assert main(["config", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "Traceback" not in err
    assert main(["config", "--preset", "tiny", "train.lam=abc"]) == 2
    assert "train.lam: expected a number" in capsys.readouterr().err

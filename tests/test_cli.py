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


def test_config_errors_exit_2_with_one_line_before_any_work(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lam: 2\n")
    assert main(["sweep", "--preset", "tiny", "--config", str(bad), f"workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "not valid YAML" in err, err
    assert main(["config", "--preset", "tiny", "train.lam=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ssae-ray config: error: train.lam=-1.0: must be >= 0", err
    assert (
        main(["physics", "--preset", "tiny", "sae.hooks=[blocks.1.resid]", f"workdir={tmp_path / 'w'}"]) == 2
    )
    assert "is not a hook point name" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing was started


def test_bias_in_bios_job_errors_exit_2_with_one_line(capsys, tmp_path, monkeypatch):
    """StageError-like package errors (a missing model folder, an unreachable tracking server) are one
    line and exit 2 from jobs/bias_in_bios.py, not tracebacks."""
    import logging
    import runpy
    from pathlib import Path

    from ssae_ray import tracking

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # log lines go to this test's stderr

    job = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "bias_in_bios.py"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{tracking.free_port()}")
    assert job["main"](["--preset", "tiny", f"workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bias_in_bios: error: cannot reach the MLflow tracking server"), err
    assert len(err.splitlines()) == 1  # before any work: not even a log line
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    args = ["--preset", "tiny", f"workdir={tmp_path / 'w'}", f"model.source={tmp_path / 'no-model'}"]
    assert job["main"](args) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("bias_in_bios: error: model folder"), err
    assert "no-model" in errors[0] and "Traceback" not in err, err
    assert job["main"](["--preset", "tiny", "shift.n_train=0"]) == 2
    assert "shift.n_train=0: must be >= 1" in capsys.readouterr().err

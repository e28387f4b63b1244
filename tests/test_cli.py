import json
import subprocess
import sys
import zipfile

from masktune_core.runfolder import ARTIFACTS, MODEL_ARTIFACTS


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "masktune_core", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_runs_on_a_zip_and_writes_the_artifacts(tiny_digits, tmp_path):
    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tiny_digits.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(tiny_digits.parent))  # wrapped in a top folder, as zipping a folder does
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"masking": {"batch_size": 50}, "erm": {"epochs": 7, "momentum": 0.5}}))
    out = tmp_path / "out"
    result = run_cli("run", "--data", archive, "--arch", "small_cnn", "--out", out, "--epochs", 2,
                     "--lr", 0.02, "--batch-size", 64, "--seed", 3, "--config", config, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    not_run = {MODEL_ARTIFACTS[m] for m in ("jtt", "dfr")}  # the baselines' models: only when asked for
    assert set(ARTIFACTS) - not_run == {p.name for p in out.iterdir() if p.is_file()}  # beside the work folder
    assert "worst_group_accuracy" in result.stdout and "MaskTune" in result.stdout
    resolved = json.loads((out / "config.json").read_text())
    # flags override the file, the file overrides the defaults
    assert resolved["config"]["erm"] == {"epochs": 2, "lr": 0.02, "batch_size": 64, "momentum": 0.5, "weight_decay": 0.0001}
    assert resolved["config"]["masking"]["batch_size"] == 50 and resolved["seed"] == 3
    assert "erm" in result.stderr and "export" in result.stderr  # progress per stage
    assert len(list((tmp_path / "cache").glob("*/28px-*/images.npy"))) == 1  # decoded once, kept for later runs


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"this is not a zip")
    common = ("--data", tmp_path / "bad.zip", "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    cases = {  # flags -> what the error must name; the three start at once (each mostly imports torch)
        ("--arch", "small_cnn"): ("error:", "archive"),
        ("--arch", "vgg99"): ("unknown architecture",),
        ("--epochs", -3): ("invalid config",),
    }
    runs = {flags: subprocess.Popen([sys.executable, "-m", "masktune_core", "run", *map(str, common + flags)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for flags in cases}
    for flags, proc in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (flags, stderr)
        assert all(text in stderr for text in cases[flags]) and "Traceback" not in stderr, (flags, stderr)

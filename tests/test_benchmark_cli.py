"""The benchmark CLI end to end (quick runs; full 5-seed runs are benchmarks)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from skdkvb import benchmark
from skdkvb.continual.datasets import FASHION_MNIST_DIR

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


def test_digits_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = benchmark.main(["--dataset", "digits", "--quick", "--json", str(out_json),
                           "--plot", str(out_png), "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    for label in ("DKVB", "DKVB i.i.d. bound", "linear probe", "MLP (128)", "NCM", "SLDA"):
        assert f"| {label} |" in text
    payload = json.loads(out_json.read_text())
    assert payload["dataset"] == "digits"
    rows = {r["method"]: r for r in payload["summary"]}
    # What the benchmark is about: DKVB keeps old classes, the linear probe does not.
    assert rows["DKVB"]["average_accuracy_mean"] > 0.8
    assert rows["DKVB"]["forgetting_mean"] < 0.1
    assert rows["linear probe"]["forgetting_mean"] > 0.2
    assert rows["SLDA"]["average_accuracy_mean"] > 0.9
    report = payload["reports"][0]
    assert np.asarray(report["accuracy_matrix"]).shape == (5, 5)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_slice(tmp_path, capsys):
    out_json = tmp_path / "f.json"
    code = benchmark.main(["--quick", "--methods", "dkvb,ncm", "--json", str(out_json),
                           "--device", "cpu"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out_json.read_text())["summary"]}
    assert set(rows) == {"DKVB", "NCM"}
    assert rows["DKVB"]["average_accuracy_mean"] > 0.6
    assert rows["DKVB"]["forgetting_mean"] < 0.15
    assert "fashion-mnist" in capsys.readouterr().out


def test_missing_fashion_mnist_exits_clearly(tmp_path, capsys):
    code = benchmark.main(["--data-dir", str(tmp_path), "--methods", "ncm"])
    assert code == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    code = benchmark.main(["--data-dir", str(tmp_path), "--methods", "ncm,slda", "--fallback",
                           "--quick"])
    captured = capsys.readouterr()
    assert code == 0 and "Falling back" in captured.err and "| SLDA |" in captured.out


def test_bad_arguments(capsys):
    assert benchmark.main(["--methods", "dkvb,lasso"]) == 2
    assert "lasso" in capsys.readouterr().err
    assert benchmark.main(["--seeds", "0", "--dataset", "toy"]) == 2
    with pytest.raises(SystemExit):
        benchmark.main(["--dataset", "cifar10"])


def test_module_entry_point_toy():
    # The DKVB side of the toy target is checked in test_continual.py.
    result = subprocess.run(
        [sys.executable, "-m", "skdkvb.benchmark", "--dataset", "toy", "--methods", "linear"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    probe = next(l for l in result.stdout.splitlines() if l.startswith("| linear probe |"))
    assert float(probe.split("|")[2].split("±")[0]) < 0.4

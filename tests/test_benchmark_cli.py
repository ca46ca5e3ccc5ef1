"""The benchmark CLI: honest output, failures before any work, and short end-to-end runs."""

import ast
import importlib.util
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from skdkvb import benchmark
from skdkvb.continual.datasets import FASHION_MNIST_DIR

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def no_work(monkeypatch):
    """Make any real work an error: what is tested must fail while parsing."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the benchmark started working before rejecting its arguments")

    monkeypatch.setattr(benchmark, "run", forbidden)


def _parse_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        benchmark.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MPL, reason="needs matplotlib")
def test_digits_quick_end_to_end(tmp_path, capsys):
    code = benchmark.main(["--dataset", "digits", "--quick", "--seeds", "2", "--out", str(tmp_path / "out"),
                           "--methods", "dkvb,dkvb-iid,iid-logreg,linear,ncm,slda", "--device", "cpu"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out
    for label in ("DKVB", "DKVB i.i.d. (upper bound)", "logistic regression i.i.d. (upper bound)",
                  "linear probe", "NCM", "SLDA"):  # fmt: skip
        assert f"| {label} |" in text
    assert "mean ± std over 2 seeds" in text and benchmark.TIME_CAPTION in text
    # Outputs go into --out, under the default names.
    out_json, out_png = tmp_path / "out" / "results.json", tmp_path / "out" / "results.png"
    payload = json.loads(out_json.read_text())
    assert payload["dataset"] == "digits" and payload["seeds"] == 2
    rows = {r["method"]: r for r in payload["summary"]}
    # What the benchmark is about: DKVB keeps old classes, the linear probe does not.
    assert rows["DKVB"]["average_accuracy_mean"] > 0.8
    assert rows["DKVB"]["forgetting_mean"] < 0.1
    assert rows["linear probe"]["forgetting_mean"] > 0.2
    assert rows["SLDA"]["average_accuracy_mean"] > 0.9
    assert rows["logistic regression i.i.d. (upper bound)"]["average_accuracy_mean"] > 0.9
    assert rows["logistic regression i.i.d. (upper bound)"]["forgetting_mean"] is None
    # One timing per method: the table's column is the per-seed wall time of the reports.
    dkvb = [r for r in payload["reports"] if r["name"] == "DKVB"]
    assert len(dkvb) == 2
    np.testing.assert_allclose(rows["DKVB"]["seconds_mean"], np.mean([r["extra"]["seconds"] for r in dkvb]))
    assert np.asarray(dkvb[0]["accuracy_matrix"]).shape == (5, 5)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Progress went to stderr (not a terminal here: plain lines), one per method at least.
    assert "DKVB: " in captured.err and "per seed" in captured.err


def test_one_seed_says_there_is_no_spread(tmp_path, capsys):
    code = benchmark.main(["--dataset", "toy", "--seeds", "1", "--methods", "ncm,slda", "--no-plot",
                           "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "1 seed: no spread" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and not any("±" in line for line in table)
    assert (tmp_path / "results.json").exists() and not (tmp_path / "results.png").exists()


def test_quiet_prints_no_progress(tmp_path, capsys):
    assert benchmark.main(["--dataset", "toy", "--seeds", "1", "--methods", "ncm", "--no-plot", "-q",
                           "--out", str(tmp_path)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "| NCM |" in captured.out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_slice(tmp_path, capsys):
    code = benchmark.main(["--quick", "--seeds", "1", "--methods", "dkvb,ncm", "--no-plot", "--device", "cpu",
                           "--json", str(tmp_path / "f.json")])  # fmt: skip
    assert code == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "f.json").read_text())["summary"]}
    assert set(rows) == {"DKVB", "NCM"}
    assert rows["DKVB"]["average_accuracy_mean"] > 0.6
    assert rows["DKVB"]["forgetting_mean"] < 0.15
    assert "fashion-mnist" in capsys.readouterr().out


def test_subsample_keeps_a_stratified_subset(tmp_path):
    from skdkvb.continual.datasets import load_dataset

    data = benchmark._subsample(load_dataset("digits"), 300)
    assert data.X_train.shape[0] == 300 and data.X_test.shape[0] == 100
    assert np.unique(data.y_train).size == 10
    reports = benchmark.run("digits", methods=["ncm"], seeds=1, subsample=300)
    assert reports[0].extra["seconds"] >= 0


def test_encoder_options_reach_embed_dataset(tmp_path, capsys, monkeypatch):
    # The CLI's side of the real setting: every encoder option reaches embed_dataset once,
    # and the learners see what it returns. (The embedding itself is tested with the encoders.)
    from sklearn.utils import Bunch

    from skdkvb.continual import datasets

    calls = []

    def fake_embed_dataset(data, **kwargs):
        calls.append(kwargs)
        n = kwargs["subsample"]
        return Bunch(X_train=data.X_train[:n, :16], y_train=data.y_train[:n], X_test=data.X_test[:, :16],
                     y_test=data.y_test, name=data.name)  # fmt: skip

    monkeypatch.setattr(datasets, "embed_dataset", fake_embed_dataset, raising=False)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    code = benchmark.main(["--dataset", "digits", "--encoder", "torchvision:mobilenet_v2", "--checkpoint",
                           str(weights), "--image-size", "64", "--subsample", "400", "--cache-dir",
                           str(tmp_path / "cache"), "--methods", "ncm", "--seeds", "1", "--no-plot", "--device",
                           "cpu", "--out", str(tmp_path / "out"), "-q"])  # fmt: skip
    assert code == 0
    assert calls == [dict(encoder="torchvision:mobilenet_v2", checkpoint_path=str(weights), image_size=64,
                          subsample=400, cache_dir=str(tmp_path / "cache"), device="cpu", verbose=0)]  # fmt: skip
    out = capsys.readouterr().out
    assert "embedded by torchvision:mobilenet_v2" in out and "torchvision:mobilenet_v2 embeddings" in out
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["encoder"] == "torchvision:mobilenet_v2" and payload["subsample"] == 400
    assert payload["dkvb_config"] == benchmark.dkvb_config("embedded")
    assert sum(len(c) for c in payload["reports"][0]["task_classes"]) == 10


def test_encoder_adds_the_iid_bounds_to_the_default_methods(tmp_path, capsys, monkeypatch):
    from skdkvb.continual import datasets

    monkeypatch.setattr(datasets, "embed_dataset", lambda data, **kwargs: data, raising=False)
    seen = {}
    monkeypatch.setattr(benchmark, "run", lambda dataset, **kwargs: seen.update(kwargs) or [])
    argv = ["--dataset", "toy", "--no-plot", "-q", "--device", "cpu", "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    assert seen["methods"] == list(benchmark.DEFAULT_METHODS)
    assert benchmark.main([*argv, "--encoder", "torchvision:mobilenet_v2"]) == 0
    assert seen["methods"] == [*benchmark.DEFAULT_METHODS, "dkvb-iid", "iid-logreg"]
    assert seen["encoder"] == "torchvision:mobilenet_v2"


def test_dkvb_gets_verbose_for_its_key_init_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    factory, _ = benchmark.make_method("dkvb", "digits", verbose=1)
    assert factory(0).verbose == 1
    seen = {}
    monkeypatch.setattr(benchmark, "run", lambda dataset, **kwargs: seen.update(kwargs) or [])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["--dataset", "toy", "--no-plot", "--device", "cpu", "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0 and seen["verbose"] == 1
    assert benchmark.main([*argv, "--quiet"]) == 0 and seen["verbose"] == 0


# ------------------------------------------------------------ failing before working
def test_missing_fashion_mnist_hint_once_names_the_option(tmp_path, capsys, no_work):
    line = _parse_error(capsys, ["--data-dir", str(tmp_path), "--methods", "ncm"])
    assert "--data-dir" in line and "data_dir=" not in line
    assert line.count("dataset-fashion-mnist") == 1
    line = _parse_error(capsys, ["--data-dir", str(tmp_path / "nonexistent")])
    assert "--data-dir" in line and "not a folder" in line


def test_missing_fashion_mnist_falls_back_to_digits(tmp_path, capsys):
    code = benchmark.main(["--data-dir", str(tmp_path), "--methods", "ncm,slda", "--fallback", "--quick",
                           "--seeds", "1", "--no-plot", "--out", str(tmp_path / "o")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and "falling back" in captured.err and "| SLDA |" in captured.out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["dataset"] == "digits"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--plot", "{tmp}/missing/r.png"], "--plot"),
        (["--json", "{tmp}/missing/r.json"], "--json"),
        (["--out", "{tmp}/missing/deeper"], "--out"),
        (["--json", "{tmp}"], "--json"),
        (["--methods", "dkvb,lasso"], "--methods"),
        (["--seeds", "0"], "--seeds"),
        (["--checkpoint", "w.pth"], "--checkpoint"),
        (["--encoder", "torchvision:mobilenet_v2", "--checkpoint", "{tmp}/missing.pth"], "argument --"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, no_work, monkeypatch, argv, option):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = _parse_error(capsys, ["--dataset", "toy", *argv])
    assert option in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even results/


def test_unwritable_output_folder(tmp_path, capsys, no_work, monkeypatch):
    # Permission bits do not stop root (CI), so the check's answer is simulated.
    folder = tmp_path / "ro"
    folder.mkdir()
    real = benchmark.os.access
    monkeypatch.setattr(benchmark.os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))
    line = _parse_error(capsys, ["--dataset", "toy", "--plot", str(folder / "r.png")])
    assert "--plot" in line and "not writable" in line
    line = _parse_error(capsys, ["--dataset", "toy", "--out", str(folder / "sub")])
    assert "--out" in line and "not writable" in line
    assert list(folder.iterdir()) == []


def test_plot_without_matplotlib_fails_at_parse_time(tmp_path, capsys, no_work, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    line = _parse_error(capsys, ["--dataset", "toy", "--out", str(tmp_path)])
    assert "--plot" in line and 'pip install "skdkvb[plot]"' in line and "--no-plot" in line


def test_cuda_without_cuda_fails_in_one_line(tmp_path, capsys, no_work):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _parse_error(capsys, ["--dataset", "toy", "--device", "cuda", "--out", str(tmp_path)])
    assert "--device" in line and "CUDA is not available" in line
    assert not (tmp_path / "results.json").exists()


def test_encoder_options_need_an_encoder(capsys, no_work):
    line = _parse_error(capsys, ["--dataset", "toy", "--image-size", "96"])
    assert "--image-size" in line and "--encoder" in line


@pytest.mark.slow
def test_bad_plot_path_in_a_fresh_process_writes_nothing(tmp_path):
    # A fresh interpreter, as a user runs it: one line on stderr, exit code 2, no file.
    result = subprocess.run(
        [sys.executable, "-m", "skdkvb.benchmark", "--plot", str(tmp_path / "missing" / "r.png")],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--plot" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- help
def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as info:
        benchmark.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"(default: {','.join(benchmark.DEFAULT_METHODS)}; with --encoder also dkvb-iid,iid-logreg)" in text
    assert f"(default: {benchmark.DEFAULT_SEEDS})" in text
    assert "(default: results)" in text and "(default: fashion-mnist)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_benchmark_module_imports_no_heavy_library_at_load():
    # torch, sklearn and the estimator are imported inside functions, after argparse.
    tree = ast.parse(Path(benchmark.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and not n.level}
    assert not names & {"torch", "sklearn", "numpy", "matplotlib", "timm"}
    assert not [n for n in top if isinstance(n, ast.ImportFrom) and n.level]


@pytest.mark.slow
def test_help_does_not_import_torch():
    code = "import runpy, sys; sys.argv = ['b', '--help']\ntry:\n runpy.run_module('skdkvb.benchmark', run_name='__main__')\nexcept SystemExit:\n pass\nprint('torch' in sys.modules)"  # noqa: E501
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.strip().splitlines()[-1] == "False"


# ----------------------------------------------------------------------- progress
def test_output_path_rule(tmp_path):
    assert benchmark._output_path(tmp_path, "r.png") == tmp_path / "r.png"
    assert benchmark._output_path(tmp_path, "sub/r.png") == Path("sub/r.png")
    assert benchmark._output_path(tmp_path, "./r.png") == Path("r.png")


def test_progress_lines_are_never_silent_long():
    stream = io.StringIO()
    progress = benchmark._Progress("lines", stream=stream, silence=0.2)
    try:
        progress.open("DKVB", total=2)
        progress.update("seed 1/1, task 1/2")
        time.sleep(1.0)  # a step that prints nothing itself
        progress.update("seed 1/1, task 2/2", n=1)
        progress.close("1.0 s per seed")
    finally:
        progress.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "DKVB ..."
    assert any(line.startswith("  ... DKVB: seed 1/1, task 1/2") for line in lines)
    assert lines[-1] == "DKVB: 1.0 s per seed"


def test_progress_off_prints_nothing():
    stream = io.StringIO()
    progress = benchmark._Progress("off", stream=stream)
    progress.open("x", total=1)
    progress.update("y", n=1)
    progress.note("z")
    progress.stop()
    assert stream.getvalue() == ""


@pytest.mark.slow
def test_module_entry_point_toy(tmp_path):
    # The DKVB side of the toy target is checked in test_continual.py.
    result = subprocess.run(
        [sys.executable, "-m", "skdkvb.benchmark", "--dataset", "toy", "--methods", "linear", "--seeds", "1",
         "--no-plot", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    probe = next(line for line in result.stdout.splitlines() if line.startswith("| linear probe |"))
    assert float(probe.split("|")[2]) < 0.4
    assert (tmp_path / "results.json").exists()


def test_embedded_config_is_a_smaller_embedding_preset():
    from skdkvb import benchmark
    from skdkvb.encoders._presets import EMBEDDING_PARAMS

    # The CLI keeps the preset's method (whitening, then top-4 counting) with fewer key rows.
    config = benchmark.DKVB_CONFIGS["embedded"]
    for name in ("input_transform", "top_k"):
        assert config[name] == EMBEDDING_PARAMS[name]
    assert config["decoder"] == "logp"
    assert config["n_heads"] * config["n_keys"] < EMBEDDING_PARAMS["n_heads"] * EMBEDDING_PARAMS["n_keys"]

"""The torch passes in their own process (toolchains/torch_worker.py): the same figures as the in-process pass on
either path, a mismatched checkpoint named in one line, an out-of-memory kill explained, memory recorded."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_layerwise import _drop, make_model, ppl, whole_model, windows_for

from quantforge import metrics
from quantforge.errors import BadInputError, OutOfMemory, SourceError
from quantforge.toolchains import torch_worker
from quantforge.toolchains.device import COMFORT, choose_forward
from quantforge.toolchains.layerwise import PeakEstimate
from quantforge.toolchains.worker import run_worker

LABEL = "m:eval-reference"


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "step.log"
    path.write_text(f"# {LABEL} (key 0123456789abcdef)\n")  # the header the engine writes
    return path


def run_both(model_dir: Path, windows_file: Path, log: Path, path: str, monkeypatch) -> tuple[dict, dict]:
    monkeypatch.setenv(torch_worker.PATH_ENV, path)
    out = model_dir.parent / path
    out.mkdir(exist_ok=True)
    ref = torch_worker.reference(model_dir, windows_file, out / "reference.npz", metrics.TOP_K, log, label=LABEL)
    imatrix = torch_worker.imatrix(model_dir, windows_file, out / "imatrix.npz", log, label="m/gguf:imatrix")
    return ref, imatrix


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_both_paths_give_the_in_process_figures(tmp_path, log, family, monkeypatch):
    model_dir = make_model(tmp_path / "model", family, layers=3)
    windows = windows_for(n=3, ctx=32)
    np.save(tmp_path / "windows.npy", windows)
    logits, expected_imatrix = whole_model(model_dir, windows, {0, 1, 2})  # what the steps computed in-process
    expected = metrics.concat([metrics.score_window(lg, w) for lg, w in zip(logits, windows, strict=True)])
    results = {path: run_both(model_dir, tmp_path / "windows.npy", log, path, monkeypatch)
               for path in ("whole-model", "streamed")}
    for path, (ref, imatrix) in results.items():
        assert (ref["path"], ref["device"], ref["dtype"]) == (path, "cpu", "float32")
        assert imatrix["path"] == path and imatrix["entries"] == len(expected_imatrix)
        assert ref["peak_rss_bytes"] > 100 * 2**20 and imatrix["peak_rss_bytes"] > 100 * 2**20
        assert f"{ref['ppl']:.4g}" == f"{ppl(logits, windows):.4g}"
        got = metrics.Reference.load(tmp_path / path / "reference.npz")
        np.testing.assert_allclose(got.nll, expected.nll, rtol=1e-5, atol=1e-6)
        matrix = np.load(tmp_path / path / "imatrix.npz")
        for name, mean in expected_imatrix.items():
            np.testing.assert_allclose(matrix[name], mean, rtol=1e-5, atol=1e-7, err_msg=name)
    # fp32 on a CPU: the streamed pass is bit-identical to the whole model
    whole, streamed = (np.load(tmp_path / p / "imatrix.npz") for p in ("whole-model", "streamed"))
    assert all(np.array_equal(whole[k], streamed[k]) for k in whole.files)
    assert results["whole-model"][0]["ppl"] == results["streamed"][0]["ppl"]
    text = log.read_text()
    # torch's and transformers' chatter lands in the step's log, with the choice and the peak
    assert "quantforge: streamed pass on cpu in float32" in text and "peak RSS" in text


@pytest.mark.slow
@pytest.mark.parametrize("path", ["whole-model", "streamed"])
def test_missing_tensor_fails_the_step_naming_it(tmp_path, log, path, monkeypatch):
    model_dir = make_model(tmp_path / "model", "llama")
    _drop(model_dir, "model.layers.1.mlp.down_proj.weight")
    np.save(tmp_path / "windows.npy", windows_for())
    monkeypatch.setenv(torch_worker.PATH_ENV, path)
    with pytest.raises(SourceError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.down_proj\.weight") as info:
        torch_worker.reference(model_dir, tmp_path / "windows.npy", tmp_path / "r.npz", 8, log, label=LABEL)
    assert "\n" not in str(info.value)


def test_a_forced_path_must_be_known(tmp_path, log, monkeypatch):
    monkeypatch.setenv(torch_worker.PATH_ENV, "halfway")
    with pytest.raises(BadInputError, match="QUANTFORGE_TORCH_PATH"):
        torch_worker.imatrix(tmp_path, tmp_path / "w.npy", tmp_path / "i.npz", log, label=LABEL)


# ------------------------------------------------------------------------------------- memory of any worker

HOG = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from quantforge.toolchains.worker import serve
    import argparse

    def hog(args):
        block = bytearray(args.mb * 2**20)  # resident: bytearray zero-fills what it allocates
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.5)  # held a while, as memory is before the kernel's out-of-memory killer strikes
        if args.kill:
            os.kill(os.getpid(), signal.SIGKILL)  # what that killer does
        return {"ok": True}

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("hog")
    command.add_argument("--mb", type=int, required=True)
    command.add_argument("--kill", action="store_true")
    sys.exit(serve(parser, {"hog": hog}))
""")


@pytest.fixture
def hog_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "hog_worker.py").write_text(HOG)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "hog_worker"


def test_peak_rss_of_the_worker_tree_is_returned(tmp_path, log, hog_module):
    result = run_worker(hog_module, ["hog", "--mb", "200"], log, tmp_path / "r.json", env=dict(os.environ))
    assert result["ok"] and 200 * 2**20 < result["peak_rss_bytes"] < 400 * 2**20


def test_an_out_of_memory_kill_names_the_step_its_peak_and_what_to_change(tmp_path, log, hog_module):
    result = run_worker(hog_module, ["hog", "--mb", "150", "--kill"], log, tmp_path / "r.json", env=dict(os.environ))
    assert not result["ok"] and result["killed"] and result["peak_rss_bytes"] > 150 * 2**20
    assert result["error"].startswith(f"{LABEL} was killed (SIGKILL: out of memory) after its processes reached ")
    assert "MB resident" in result["error"] and "--threads" in result["error"] and "GPU" in result["error"]


def test_torch_steps_raise_out_of_memory(tmp_path, log, hog_module, monkeypatch):
    monkeypatch.setattr(torch_worker, "WORKER", hog_module)
    with pytest.raises(OutOfMemory, match=f"{LABEL} was killed .* calibration.samples"):
        torch_worker._run("hog", ["--mb", "120", "--kill"], tmp_path / "x.npz", log, LABEL, None)


# ----------------------------------------------------------------------------------------- the path chosen

def estimate(whole: int, streamed: int, whole_gpu: int, streamed_gpu: int):
    return lambda _dtype: PeakEstimate(whole, streamed, whole_gpu, streamed_gpu, 10)


@pytest.mark.parametrize(("whole", "available", "gpu_free", "forced", "expected"), [
    (100, 200, None, None, ("whole-model", "cpu")),
    (100, int(100 / COMFORT) - 1, None, None, ("streamed", "cpu")),  # fits, but not comfortably
    (100, 50, None, "whole-model", ("whole-model", "cpu")),
    (100, 500, None, "streamed", ("streamed", "cpu")),
    (100, 50, 1000, None, ("whole-model", "cuda")),  # whole on the GPU: 60 of 1000
    (100, 50, 70, None, ("streamed", "cuda")),  # 60 does not fit 70 comfortably; 20 does
    (100, 500, 10, None, ("whole-model", "cpu")),  # nothing fits the GPU: the CPU
])
def test_choose_forward(whole, available, gpu_free, forced, expected):
    choice = choose_forward(estimate(whole, 30, 60, 20), available, gpu_free, forced)
    assert (choice.path, choice.device) == expected
    assert choice.dtype == ("bfloat16" if choice.device == "cuda" else "float32")
    assert json.loads(json.dumps(choice.to_json()))["path"] == choice.path

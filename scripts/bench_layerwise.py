"""Peak RSS and time of the whole-model torch forward against the layer-streamed one (quantforge.toolchains.layerwise).

    .venv/bin/python scripts/bench_layerwise.py [--model DIR] [--windows 8] [--ctx 512]

Without --model, a random-weight Llama of about 100M parameters (fp16 safetensors, ~200 MB; 400 MB in fp32) is
made in a temporary folder. Each pass runs in its own process and reports its own peak (VmHWM, which, unlike
ru_maxrss, does not inherit the parent's peak across fork).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
from quantforge import metrics
from quantforge.toolchains.layerwise import stream_forward

mode, model_dir, n, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
vocab = json.load(open(f"{model_dir}/config.json"))["vocab_size"]
windows = np.random.default_rng(0).integers(0, vocab, size=(n, ctx))
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
before = status("VmRSS")
started = time.perf_counter()
parts = []
if mode == "whole":
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for w in windows:
            parts.append(metrics.score_window(model(torch.from_numpy(w[None]).long()).logits[0].float().numpy(), w))
else:
    stream_forward(model_dir, windows, on_logits=lambda i, logits: parts.append(metrics.score_window(logits,
                   windows[i])))
ppl = metrics.perplexity(metrics.concat(parts).nll)[0]
print(json.dumps({"seconds": time.perf_counter() - started, "ppl": ppl, "rss_after_imports_kb": before,
                  "peak_rss_kb": status("VmHWM")}))
"""


def make_model(dest: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(dest)
    return dest


def run(mode: str, model: Path, windows: int, ctx: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(model), str(windows), str(ctx)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    if proc.wait():
        return {"mode": mode, "returncode": proc.returncode}
    result = json.loads(out.strip().splitlines()[-1])
    return {"mode": mode, "peak_rss_mb": round(result["peak_rss_kb"] / 1024),
            "rss_after_imports_mb": round(result["rss_after_imports_kb"] / 1024),
            "seconds": round(result["seconds"], 2), "ppl": round(result["ppl"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp) / "model")
        from quantforge.toolchains.layerwise import estimate_peak_bytes

        estimate = estimate_peak_bytes(model, (args.windows, args.ctx))
        print(json.dumps({"estimate_mb": {k: round(v / 2**20) for k, v in estimate._asdict().items()}}))
        for mode in ("whole", "streamed"):
            print(json.dumps(run(mode, model, args.windows, args.ctx)))


if __name__ == "__main__":
    main()

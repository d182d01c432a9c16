"""Layer-streamed forward passes over a Hugging Face causal LM, for models larger than memory.

The torch reference pass and the importance-matrix pass used to load the whole source model (fp32 on a CPU: 28-128
GB for 7B-32B). Here, as in llama.cpp's and GPTQModel's sequential pipelines, the model is a skeleton on the meta
device and its weights are read from the safetensors shards one part at a time, in layer-major order: the
embeddings (all windows embedded), then each decoder layer in turn (run over every window, then freed), then the
final norm and the LM head (full-vocabulary logits of one window at a time, handed to a callback). Peak memory is
one decoder layer or the embedding/head matrix, plus the hidden states of all windows (windows x seq x hidden).

The model's own code runs everywhere it matters: the decoder layers' call arguments (rotary position embeddings,
masks per layer type, position ids) and the first layer's input are caught from the base model's forward with the
layers stubbed out, and the logits come from the CausalLM's forward with the base model stubbed out, so
embedding scaling, sliding windows and logit soft-capping follow the architecture's code, not ours.
"""

from __future__ import annotations

import ctypes
import json
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import BadInputError, ToolchainError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# RSS of a CPU process once torch 2.13, transformers 5.24 and the modules transformers imports lazily when it
# builds a model are loaded (measured: 0.35 GB)
BASELINE_BYTES = 350 * 2**20
STREAMED_SLACK = 64 * 2**20  # the meta skeleton, the caught layer calls, the allocator's own
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class UnsupportedArchitecture(ToolchainError):
    """The model cannot be run layer by layer (no decoder-layer list, parameters outside the streamed parts, or
    checkpoint tensors that transformers converts on load)."""


class CheckpointMismatch(BadInputError):
    """The checkpoint's tensors are not the ones the model's architecture expects."""


class PeakEstimate(NamedTuple):
    whole_model: int  # bytes: the whole model loaded in the compute dtype (what evaluate/calibrate do today)
    streamed: int  # bytes: stream_forward
    # bytes on the compute device when it is a GPU (weights, activations, logits; no process baseline)
    whole_model_device: int = 0
    streamed_device: int = 0
    largest_stored: int = 0  # bytes: the checkpoint's largest tensor as stored (read through host memory)


def _header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor table (dtype, shape, data_offsets), read without touching the data."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the shard holding it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        return {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    if (model_dir / SINGLE_FILE).is_file():
        return dict.fromkeys(_header(model_dir / SINGLE_FILE), model_dir / SINGLE_FILE)
    raise CheckpointMismatch(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; the layer-streamed pass reads only "
                             "safetensors checkpoints")


def checkpoint_tensors(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Every tensor of a safetensors checkpoint -> (bytes per element as stored, number of elements), from the
    headers alone."""
    out = {}
    files = _tensor_files(Path(model_dir))
    for shard in set(files.values()):
        for name, info in _header(shard).items():
            out[name] = (_SAFETENSORS_ITEMSIZE.get(info["dtype"], 4), int(np.prod(info["shape"], dtype=np.int64)))
    return out


def _first(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def mismatch_text(arch: str, missing: Iterable[str], unexpected: Iterable[str]) -> str:
    """What is wrong with a checkpoint's tensors, in one phrase naming the first of them (missing ones first);
    shared by the streamed pass and the whole-model load (torch_worker), so both fail alike."""
    missing, unexpected = list(missing), list(unexpected)
    if missing:
        return f"lacks {len(missing)} tensor(s) the {arch} architecture expects: {_first(missing)}"
    return f"has {len(unexpected)} tensor(s) the {arch} architecture does not use: {_first(unexpected)}"


class _Streamer:
    """The skeleton, its parts, and where each of their tensors is read from."""

    def __init__(self, model_dir: Path, device: str, dtype: str):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        config = AutoConfig.from_pretrained(model_dir)
        # parameters on meta; buffers (rotary inv_freq) are computed for real, in the dtype from_pretrained uses
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        model, arch = self.model, type(self.model).__name__
        self.base = getattr(model, model.base_model_prefix, None)
        self.layers = getattr(self.base, "layers", None)
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.norm = getattr(self.base, "norm", None)
        parts = {"base model": self.base, "base_model.layers (a ModuleList)": self.layers,
                 "input embeddings": self.embed, "output embeddings": self.head, "base_model.norm": self.norm}
        lacking = [what for what, part in parts.items() if not isinstance(part, torch.nn.Module)]
        if lacking or not isinstance(self.layers, torch.nn.ModuleList):
            lacking = lacking or ["base_model.layers ModuleList"]
            raise UnsupportedArchitecture(f"{arch}: cannot stream it layer by layer: no {', '.join(lacking)}")
        names = {id(m): name for name, m in model.named_modules()}
        self.prefix = {part: names[id(part)] for part in (self.embed, self.head, self.norm, self.layers)}
        streamed = tuple(p + "." for p in self.prefix.values())
        others = [n for n, _ in model.named_parameters(remove_duplicate=False) if not n.startswith(streamed)]
        if others:  # e.g. a vision tower or extra projections the layer-major schedule would never load
            raise UnsupportedArchitecture(f"{arch}: parameters outside embeddings/layers/norm/head: {_first(others)}")
        self.source = self._resolve(model_dir, arch)
        for name, buffer in model.named_buffers():  # the base model's own (rotary inv_freq) run on the device
            _assign(model, name, buffer.to(self.device))

    def _resolve(self, model_dir: Path, arch: str) -> dict[str, tuple[Path, str]]:
        """Every state-dict key of the skeleton -> (shard, checkpoint tensor name); raise on any difference."""
        files = _tensor_files(model_dir)
        expected = set(self.model.state_dict())  # parameters and persistent buffers, tied ones under both names
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        alias = {**tied, **{source: target for target, source in tied.items()}}  # from_pretrained ties both ways
        source, missing = {}, []
        for key in expected:
            name = key if key in files else alias.get(key)
            if name in files:
                source[key] = (files[name], name)
            else:
                missing.append(key)
        ignored = [*(getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ()), r"rotary_emb\.inv_freq"]
        unexpected = [n for n in files if n not in expected and n not in alias
                      and not any(re.search(p, n) for p in ignored)]
        if missing or unexpected:
            what = mismatch_text(arch, missing, unexpected)
            try:
                from transformers.conversion_mapping import extract_weight_conversions_for_model
                converted = extract_weight_conversions_for_model(self.model)
            except ImportError:
                converted = None
            if converted:  # e.g. MoE experts fused on load: the stored names are not the module's
                raise UnsupportedArchitecture(f"{model_dir}: the checkpoint {what}; transformers converts this "
                                              f"architecture's tensors on load, which the streamed pass does not")
            raise CheckpointMismatch(f"{model_dir}: the checkpoint {what}")
        return source

    def load(self, module: torch.nn.Module, prefix: str) -> None:
        """Read `module`'s tensors from the shards onto the compute device (floating ones in the compute dtype)."""
        from safetensors import safe_open

        by_shard: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        stored = set()
        for local, _ in [*module.named_parameters(), *module.named_buffers()]:
            if f"{prefix}.{local}" in self.source:
                shard, name = self.source[f"{prefix}.{local}"]
                by_shard[shard].append((local, name))
                stored.add(local)
        for shard, items in by_shard.items():
            with safe_open(shard, framework="pt") as f:  # opened per part, so its mapped pages go when it is done
                for local, name in items:
                    tensor = f.get_tensor(name)
                    # one tensor at a time: the stored (fp16/bf16) copy is freed as soon as it is converted
                    _assign(module, local, tensor.to(self.device, self.dtype) if tensor.is_floating_point()
                            else tensor.to(self.device))
        for local, buffer in module.named_buffers():
            if local not in stored and buffer.is_meta:  # a non-persistent buffer of a released part
                raise UnsupportedArchitecture(f"{prefix}.{local}: a buffer neither stored nor computed")

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        import torch

        for local, tensor in [*module.named_parameters(), *module.named_buffers()]:
            _assign(module, local, torch.empty_like(tensor, device="meta"))
        _trim_heap()

    def catch(self, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
        """Run the base model's forward on one window with every decoder layer and the final norm stubbed out
        (their weights are not loaded): each layer's call (args, kwargs) as the model makes it; the first layer's
        hidden states are the embedded window."""
        calls: list[tuple[tuple, dict]] = []

        def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))

        def passthrough(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
            return hidden_states

        stubbed = [*self.layers, self.norm]
        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers]
        for module in stubbed:
            module.forward = passthrough  # an instance attribute shadows the class's forward
        try:
            self.base(input_ids=ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            for module in stubbed:
                del module.forward
        if len(calls) != len(self.layers):
            raise UnsupportedArchitecture(f"{type(self.model).__name__}: its forward called {len(calls)} of its "
                                          f"{len(self.layers)} decoder layers; cannot stream it layer by layer")
        return calls

    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The CausalLM's own forward (head, soft-capping, scaling) on the last layer's output."""
        from transformers.modeling_outputs import BaseModelOutputWithPast

        def base(*_args: Any, **_kwargs: Any) -> BaseModelOutputWithPast:
            return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))

        self.base.forward = base
        try:
            return self.model(input_ids=ids, use_cache=False).logits
        finally:
            del self.base.forward


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. glibc serves allocations under its (adaptive, up to 32 MB) mmap
    threshold from the heap and keeps what is freed there: without this, a model whose tensors are under 32 MB
    grew by most of a layer per layer (measured: 351 -> 502 MB over 6 layers of 35 MB; flat at 367 MB with it)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (macOS, musl): nothing to do
        pass


def _assign(module: torch.nn.Module, local: str, tensor: torch.Tensor) -> None:
    import torch

    path, _, leaf = local.rpartition(".")
    owner = module.get_submodule(path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _hidden_and_rest(call: tuple[tuple, dict]) -> tuple[torch.Tensor, tuple[tuple, dict]]:
    """Split a caught layer call into its hidden-states input and the rest (the same for every window)."""
    args, kwargs = call
    if args:
        return args[0], (args[1:], kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), ((), rest)


def stream_forward(model_dir: Path, windows: np.ndarray, *, device: str = "cpu", dtype: str = "float32",
                   logits_for: Iterable[int] | None = None,
                   on_logits: Callable[[int, np.ndarray], None] | None = None,
                   imatrix_for: Iterable[int] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray] | None:
    """Run a safetensors causal LM over token windows ([n, seq] ids) one decoder layer at a time.

    For each window in `logits_for` (default: all windows when `on_logits` is given), calls
    `on_logits(index, logits)` with its full-vocabulary float32 logits [seq, vocab], in index order. With
    `imatrix_for`, returns for every nn.Linear except the output head (by its module name) the mean squared input
    per column over the tokens of those windows, as calibrate's importance-matrix pass computes it; else None.
    """
    import torch

    windows = np.asarray(windows)
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows must be a 2-D array of token ids, got {windows.dtype} {windows.shape}")
    n = len(windows)
    to_score = set(range(n) if logits_for is None and on_logits is not None else logits_for or ())
    to_collect = set(imatrix_for or ())
    if to_score and on_logits is None:
        raise ValueError("logits_for needs on_logits")
    if outside := sorted(i for i in to_score | to_collect if not 0 <= i < n):
        raise ValueError(f"window indices {outside[:5]} outside 0..{n - 1}")
    say = progress or (lambda _message: None)
    streamer = _Streamer(Path(model_dir), device, dtype)
    layers_prefix = streamer.prefix[streamer.layers]
    active = sorted(to_score | to_collect)
    ids = {w: torch.from_numpy(windows[w][None, :].astype(np.int64)).to(streamer.device) for w in active}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    collecting = False

    def collect(name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            if collecting:  # same statistic, same float32 arithmetic as calibrate.run_imatrix
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                squares = (x * x).sum(dim=0)
                sums[name] = sums[name] + squares if name in sums else squares
                counts[name] += x.shape[0]
        return hook

    with torch.inference_mode():
        say("embeddings")
        streamer.load(streamer.embed, streamer.prefix[streamer.embed])
        states: dict[int, torch.Tensor] = {}
        rests: list[tuple[tuple, dict]] = []
        for w in active:
            calls = streamer.catch(ids[w])
            states[w] = _hidden_and_rest(calls[0])[0]
            # windows are all [1, seq] without padding, so every window's layer calls differ only by the input
            rests = rests or [_hidden_and_rest(call)[1] for call in calls]
        streamer.release(streamer.embed)
        for i, layer in enumerate(streamer.layers):
            say(f"layer {i + 1}/{len(streamer.layers)}")
            streamer.load(layer, f"{layers_prefix}.{i}")
            handles = [module.register_forward_pre_hook(collect(f"{layers_prefix}.{i}.{name}"))
                       for name, module in layer.named_modules()
                       if to_collect and isinstance(module, torch.nn.Linear)]
            try:
                for w in active:
                    collecting = w in to_collect
                    args, kwargs = rests[i]
                    out = layer(states[w], *args, **kwargs)
                    states[w] = out[0] if isinstance(out, tuple) else out
            finally:
                for handle in handles:
                    handle.remove()
            streamer.release(layer)
        for w in to_collect - to_score:
            del states[w]
        if to_score:
            say("head")
            streamer.load(streamer.norm, streamer.prefix[streamer.norm])
            streamer.load(streamer.head, streamer.prefix[streamer.head])
            for w in sorted(to_score):
                logits = streamer.logits(ids[w], states.pop(w))
                assert on_logits is not None
                on_logits(w, logits[0].float().cpu().numpy())
    if imatrix_for is None:
        return None
    return {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sorted(sums)}


def estimate_peak_bytes(model_dir: Path, windows_shape: tuple[int, int], dtype: str = "float32") -> PeakEstimate:
    """Peak resident memory of a forward pass over `windows_shape` windows, from config.json and the safetensors
    headers (no weights read): the whole model loaded at once, and stream_forward."""
    model_dir = Path(model_dir)
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    parts: dict[str, int] = defaultdict(int)  # part (embed, layer i, head: lm_head and norm) -> parameters
    largest_stored = stored_total = 0
    for name, (size, numel) in checkpoint_tensors(model_dir).items():
        stored = numel * size
        largest_stored, stored_total = max(largest_stored, stored), stored_total + stored
        layer = re.search(r"\.layers\.(\d+)\.", name)
        parts[f"layer {layer[1]}" if layer else "embed" if "embed_tokens" in name else "head"] += numel
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    n, seq = windows_shape
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    whole = sum(parts.values())  # a tied head is stored (and loaded by from_pretrained) once
    if parts["head"] < vocab * hidden:  # tied: the streamed last stage reads the embedding matrix again
        parts["head"] += parts["embed"]
    heads, inter = config.get("num_attention_heads", 1), config.get("intermediate_size", 4 * hidden)
    # one window at a time: attention scores (fp32 softmax), MLP activations, and the full-vocabulary logits kept
    # three times (the model's, the float32 numpy copy, the caller's log-softmax)
    working = 2 * heads * seq * seq * 4 + 3 * seq * inter * itemsize + 3 * seq * vocab * 4
    # from_pretrained holds the mapped checkpoint pages while it converts them (measured on a 100M-parameter fp16
    # Llama: 943 MB peak, 0.35 + 0.41 fp32 + 0.21 stored)
    whole_bytes = BASELINE_BYTES + whole * itemsize + stored_total + working
    streamed_device = max(parts.values()) * itemsize + n * seq * hidden * itemsize + working
    # a part's stored copy is read while it is loaded, its working memory needed once it runs: one or the other
    # (measured with scripts/bench_scale.py on Qwen2 0.1B and 0.5B: 1.17 and 1.42 GB; this gives 1.20 and 1.45)
    streamed_bytes = (BASELINE_BYTES + STREAMED_SLACK + max(parts.values()) * itemsize + n * seq * hidden * itemsize
                      + max(largest_stored, working))
    return PeakEstimate(whole_bytes, streamed_bytes, whole * itemsize + working, streamed_device, largest_stored)

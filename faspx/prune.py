"""The sequential FASP driver: walk the decoder layers one at a time, prune and restore each pair.

Per layer (design.md): gather G at the attention consumer's input, prune + restore the V/O pair;
gather G at the FFN consumer's input with the pruned attention in place, prune + restore the FFN
pair; make the next layer's inputs from the pruned layer (from the FFN pass's kept activations
where the FFN output is the layer's last addition, else by running it again). Only the layer being
pruned is on the device, in the forward dtype; the master weights stay where they were loaded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from faspx.adapters import Adapter, Pair, adapter_for
from faspx.budget import Budget, candidates, plan
from faspx.errors import FaspxError, UsageError
from faspx.restore import Stats, add_gram, choose_damp, reconstruction_error, restore
from faspx.score import kept_columns, score, select, select_obs
from faspx.widths import allocate, candidate_removals

log = logging.getLogger("faspx")

# When G[M, M] + delta I is not positive definite, retry with 10x, 100x, ... the damping (from
# at least MIN_RETRY_DAMP, so that a requested damping of 0 can recover too).
DAMP_RETRIES = 4
MIN_RETRY_DAMP = 1e-4
# --structure auto judges each candidate split on this many calibration samples (a forward each).
AUTO_SAMPLES = 8
SELECTIONS = ("wanda", "obs")
TARGETS = ("pruned", "dense")
FFN_WIDTHS = ("uniform", "per-layer")
# --ffn-widths per-layer measures each layer's error curves on the first calibration samples holding
# this many tokens (and at least 4 per FFN channel, so that the Gram is well sampled).
WIDTH_TOKENS = 16384


@dataclass(frozen=True)
class Method:
    """How pairs are chosen and restored; the defaults are the paper's FASP."""

    restore: bool = True
    damp: float | str = 0.01
    selection: str = "wanda"
    target: str = "pruned"
    bias: bool = False
    # Keep plain removal where the restoration raises the layer's error (faspx; the paper has no guard).
    guard: bool = True

    def check(self) -> None:
        """UsageError for a value outside the known choices."""
        if self.selection not in SELECTIONS:
            raise UsageError(f"selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        if not (self.damp == "auto" or isinstance(self.damp, (int, float)) and self.damp >= 0):
            raise UsageError(f"damp must be a number >= 0 or 'auto' (got {self.damp!r})")
        if self.target not in TARGETS:
            raise UsageError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")


@dataclass
class PairResult:
    """What happened to one pair of one layer; errors are ||W'X - WX||^2 / ||WX||^2."""

    keep: list[int]
    n_units: int
    err_removed: float = 0.0
    err_restored: float | None = None
    damp: float | None = None
    restored: bool = False


@dataclass
class PruneReport:
    """Everything ``prune`` did: the plan, per-layer kept units and errors, and timings."""

    sparsity: float
    structure: str
    restore: bool
    damp: float | str
    selection: str
    target: str
    bias: bool
    guard: bool
    n_remove: dict[str, int]
    removed_fraction: float
    device: str
    dtype: str
    n_calib: int
    seqlen: int
    layers: list[dict[str, PairResult]] = field(default_factory=list)
    seconds: float = 0.0
    # --structure auto: every candidate split ({"n_remove", "error"}) and the one chosen
    splits: list[dict] | None = None
    ffn_widths: str = "uniform"
    # --ffn-widths per-layer: each layer's FFN width, and each layer's measured error per candidate width
    layer_widths: list[int] | None = None
    width_errors: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (the kept indices are what fasp.json records)."""
        return asdict(self)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when it is there, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Forward dtype: bfloat16 on CUDA and float32 on the CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UsageError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return names[dtype]


@torch.no_grad()
def prune(
    model: nn.Module,
    calib_ids: torch.Tensor,
    sparsity: float,
    *,
    structure: str = "fasp",
    restore_weights: bool = True,
    damp: float | str = 0.01,
    selection: str = "wanda",
    target: str = "pruned",
    bias: bool = False,
    guard: bool = True,
    ffn_widths: str = "uniform",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place with FASP and return what was done.

    ``calib_ids`` is a (samples x seqlen) LongTensor of calibration tokens. ``selection`` is
    ``wanda`` (the paper's structured Wanda score) or ``obs`` (restoration-aware). ``target`` is what
    the restoration reproduces: ``pruned`` (the paper: W X on the inputs of the model pruned so far)
    or ``dense`` (W X on the dense model's inputs, so each layer corrects the drift before it).
    ``bias=True`` solves a bias shift together with W* where the consumer has a bias or a stock config
    field can give it one (OPT; LLaMA's mlp_bias / attention_bias). The FFN pair shrinks physically
    (the config's FFN width is updated); the V/O pair is zeroed at full width so that the result
    stays a stock transformers model. ``guard=False`` accepts a restoration even where it raises the
    layer's error, as the paper does (by default plain removal is kept there).
    ``ffn_widths="per-layer"`` (LLaMA only) keeps the total FFN budget but shares it between layers by
    measured error, in widths that are multiples of 256 (``choose_widths``): the result is no longer a
    stock LlamaForCausalLM; exporters.hf writes it in the nemotron-nas form that vLLM serves.

    Example:
        >>> import torch; from transformers import AutoModelForCausalLM, OPTConfig
        >>> cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        ...                 vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)
        >>> model = AutoModelForCausalLM.from_config(cfg).eval()
        >>> report = prune(model, torch.randint(0, 100, (4, 16)), 0.2, progress=False)
        >>> model.config.ffn_dim < 64
        True
    """
    method = Method(restore_weights, damp, selection, target, bias, guard)
    method.check()
    adapter = adapter_for(model.config)
    budget = plan(model, adapter, sparsity, structure)
    check_ffn_widths(model.config, adapter, ffn_widths)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    pairs = adapter.pairs(model.config)
    report = PruneReport(
        sparsity=sparsity, structure=structure, restore=restore_weights, damp=damp, selection=selection,
        target=target, bias=bias, guard=guard, n_remove=dict(budget.n_remove), removed_fraction=budget.removed_fraction,
        device=str(device), dtype=str(dtype).removeprefix("torch."),
        n_calib=int(calib_ids.shape[0]), seqlen=int(calib_ids.shape[1]), ffn_widths=ffn_widths,
    )
    start = time.perf_counter()
    if all(n == 0 for n in budget.n_remove.values()):
        report.seconds = time.perf_counter() - start
        return report

    layers = adapter.layers(model)
    hidden, layer_kwargs = capture_layer_inputs(model, layers, calib_ids, device, dtype)
    if structure == "auto":
        budget, report.splits = choose_split(layers, hidden, layer_kwargs, pairs,
                                             candidates(model, adapter, sparsity), method, device=device,
                                             dtype=dtype, progress=progress)
        report.n_remove, report.removed_fraction = dict(budget.n_remove), budget.removed_fraction
        log.info("--structure auto chose %s", ", ".join(f"{p} {n} units" for p, n in budget.n_remove.items()))
    layer_budgets = [budget] * len(layers)
    if ffn_widths == "per-layer" and budget.n_remove["ffn"] > 0:
        layer_budgets, report.width_errors = choose_widths(layers, hidden, layer_kwargs, pairs, budget, method,
                                                           device=device, dtype=dtype, progress=progress)
        report.removed_fraction = sum(b.removed_fraction for b in layer_budgets) / len(layers)
        log.info("--ffn-widths per-layer chose FFN widths %s",
                 [budget.units["ffn"] - b.n_remove["ffn"] for b in layer_budgets])
    dense_hidden = [h.clone() for h in hidden] if target == "dense" else None
    # Bias-aware restoration where the consumer has a bias or a stock field can give it one.
    biased = {p.name for p in pairs if bias and budget.n_remove[p.name] > 0
              and (layers[0].get_submodule(p.consumer).bias is not None or adapter.bias_field(model.config, p.name))}
    # Where the FFN's output is the last addition to the residual stream, the layer's next inputs are
    # made from the FFN statistics pass (residual + restored consumer) instead of a rerun of the layer.
    residual = adapter.ffn_residual_input(model.config) if dense_hidden is None else None
    if residual and not stash_fits(stash_bytes(hidden, budget.units["ffn"]), hidden[0].device):
        log.info("the FFN inputs of %d samples do not fit in memory: every layer is rerun to advance", len(hidden))
        residual = None
    bar = tqdm(range(len(layers)), desc="pruning layers", unit="layer", disable=not progress)
    for i in bar:
        results = prune_layer(layers[i], hidden, layer_kwargs, pairs, layer_budgets[i], i, method, biased,
                              device=device, dtype=dtype, dense_hidden=dense_hidden, residual=residual)
        report.layers.append(results)
        bar.set_postfix({p: f"{r.err_restored if r.err_restored is not None else r.err_removed:.3g}"
                         for p, r in results.items()})
        log.info("layer %d: %s", i, ", ".join(
            f"{p} kept {len(r.keep)}/{r.n_units} err {r.err_removed:.4g}"
            + (f" -> {r.err_restored:.4g}" if r.err_restored is not None else "")
            for p, r in results.items()))
    if ffn_widths == "per-layer":
        report.layer_widths = adapter.ffn_widths(model)
        # In memory the config keeps one width (the largest); exporters.hf writes the per-layer ones.
        setattr(model.config, adapter.ffn_width_key, max(report.layer_widths))
    else:
        set_ffn_width(model, adapter)
    for name in biased:
        enable_bias(model, adapter, name)
    report.seconds = time.perf_counter() - start
    return report


def check_ffn_widths(config, adapter: Adapter, ffn_widths: str) -> None:
    """UsageError unless ``ffn_widths`` is known and, for per-layer, the model can take it (cheap: config only)."""
    if ffn_widths not in FFN_WIDTHS:
        raise UsageError(f"ffn_widths {ffn_widths!r} is not one of {', '.join(FFN_WIDTHS)}")
    if ffn_widths == "uniform":
        return
    if config.model_type not in adapter.per_layer_types:
        raise UsageError(
            f"--ffn-widths per-layer exports in the nemotron-nas (DeciLM) form, which has LLaMA's layer: model "
            f"type {config.model_type!r} cannot take it (supported: llama); use --ffn-widths uniform"
        )
    if len(candidate_removals(getattr(config, adapter.ffn_width_key))) < 2:
        raise UsageError(
            f"--ffn-widths per-layer needs an FFN width of at least 512 (widths are multiples of 256); "
            f"this model's is {getattr(config, adapter.ffn_width_key)}"
        )


def choose_widths(layers: nn.ModuleList, hidden: list[torch.Tensor], layer_kwargs: dict, pairs: list[Pair],
                  budget: Budget, method: Method, *, device: torch.device, dtype: torch.dtype,
                  progress: bool = True) -> tuple[list[Budget], dict]:
    """``--ffn-widths per-layer``: each layer's FFN budget, sharing the uniform plan's total by error.

    The dense model runs over the first calibration samples holding WIDTH_TOKENS tokens (a fixed
    cost, not a share of the calibration set). In every layer the FFN is pruned to every allowed
    width (``candidate_removals``) as ``method`` would prune it, and the error is measured against
    the residual stream token by token: sum_t ||dW x_t||^2 / ||h_t||^2 (h_t: the layer's input).
    Measured against the layer's own output instead, layers whose FFN output is small next to the
    stream look cheap to cut, and the result is far worse (README). ``faspx.widths.allocate`` then
    picks the widths with the least summed error. A pruned attention pair is left dense here.
    Returns the per-layer budgets and {"removals", "errors"} (errors[layer][candidate]).
    """
    ffn = next(p for p in pairs if p.name == "ffn")
    width = budget.units["ffn"]
    removals = candidate_removals(width)
    tokens = max(WIDTH_TOKENS, 4 * width)
    stream = [h.clone() for h in hidden[:-(-tokens // hidden[0].shape[1])]]
    errors = torch.zeros(len(layers), len(removals), dtype=torch.float64)
    for i, layer in enumerate(tqdm(layers, desc="per-layer widths: error curves", unit="layer",
                                   disable=not progress)):
        work = copy.deepcopy(layer).to(device=device, dtype=dtype)
        n = work.get_submodule(ffn.consumer).in_features
        folds = [Stats(torch.zeros(n, n, dtype=torch.float64, device=device)) for _ in range(2)]
        token_gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        for j, x in enumerate(stream):
            x_in = consumer_input(work, ffn.consumer, x, layer_kwargs)  # float32, as in consumer_stats
            with exact_bf16_products(work.get_submodule(ffn.consumer)):
                add_gram(folds[j % 2].gram, x_in)
            stream_energy = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=1).clamp_min(1e-12)
            token_gram.add_((x_in / stream_energy[:, None].to(x_in.device)).T @ x_in)
        gram = (folds[0] + folds[1]).gram
        weight = work.get_submodule(ffn.consumer).weight.to(device=gram.device, dtype=torch.float64)
        # Each candidate's kept columns, chosen once (with --selection obs a choice is an O(n^3) solve).
        kept = {r: kept_columns(choose_keep(weight, gram, ffn, r, method), ffn.col_unit.to(gram.device))
                for r in removals if r}
        damp = method.damp
        if damp == "auto" and method.restore:
            # One damping per layer, chosen at the uniform plan's width, serves every candidate.
            nearest = min(kept, key=lambda r: abs(r - budget.n_remove["ffn"]))
            damp = choose_damp(weight, folds, kept[nearest])
        for k, n_remove in enumerate(removals):
            if n_remove == 0:
                continue
            keep_cols = kept[n_remove]
            plain = torch.zeros_like(weight)
            plain[:, keep_cols] = weight[:, keep_cols]
            new = plain
            restored = restore(weight, gram, keep_cols, max(damp, MIN_RETRY_DAMP)) if method.restore else None
            if restored is not None:
                new = torch.zeros_like(weight)
                new[:, keep_cols] = restored
                if method.guard and reconstruction_error(weight, new, gram) > reconstruction_error(weight, plain, gram):
                    new = plain
            errors[i, k] = reconstruction_error(weight, new, token_gram)
        advance(work, stream, layer_kwargs, device)
    picks = allocate(errors, removals, len(layers) * budget.n_remove["ffn"])
    budgets = [dataclasses.replace(budget, n_remove={**budget.n_remove, "ffn": removals[k]}) for k in picks]
    return budgets, {"removals": removals, "errors": errors.tolist()}


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the statistics it needs are collected."""


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor,
                         device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], dict]:
    """Inputs of decoder layer 0 for every calibration sample, and the keyword arguments the model
    passes its layers (masks, positions, rotary embeddings): the same for every sample of one length.

    Everything but the decoder layers visits ``device`` in ``dtype`` for the time of the capture.
    """
    layer_params = {id(p) for p in layers.parameters()}
    moved: list[tuple[nn.Parameter, torch.Tensor]] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in layer_params or id(p) in seen:
                continue
            seen.add(id(p))
            moved.append((p, p.data))
            p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
    buffers = [(m, n, b) for m in model.modules() for n, b in m.named_buffers(recurse=False)
               if not any(b is lb for lb in layers.buffers())]
    for m, n, b in buffers:
        m._buffers[n] = b.to(device)

    hidden: list[torch.Tensor] = []
    captured: dict = {}
    store = storage_device(calib_ids.numel() * model.config.hidden_size * dtype.itemsize, device)

    def grab(_module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach().to(store))
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for sample in calib_ids:
            try:
                model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for p, data in moved:
            p.data = data
        for m, n, b in buffers:
            m._buffers[n] = b
    return hidden, captured


def storage_device(nbytes: int, device: torch.device) -> torch.device:
    """Keep the layer activations on the GPU when they take under a third of its free memory."""
    if device.type == "cuda" and stash_fits(nbytes, device):
        return device
    return torch.device("cpu") if device.type == "cuda" else device


def prune_layer(layer: nn.Module, hidden: list[torch.Tensor], layer_kwargs: dict, pairs: list[Pair],
                budget: Budget, index: int, method: Method, biased: set[str], *, device: torch.device,
                dtype: torch.dtype, dense_hidden: list[torch.Tensor] | None = None,
                residual: str | None = None) -> dict[str, PairResult]:
    """Prune the pairs of one layer in order, then replace ``hidden`` by the pruned layer's outputs.

    With ``dense_hidden`` (the dense model's inputs to this layer) each consumer is restored towards
    the dense model's output on the dense inputs, and ``dense_hidden`` advances through the dense layer.
    With ``residual`` (``Adapter.ffn_residual_input``) and the FFN pair pruned, the FFN statistics
    pass keeps that module's input and the consumer's input of every sample, and the outputs are
    their sum through the restored consumer: the same as rerunning the pruned layer, at the cost of
    one matrix product.
    """
    results: dict[str, PairResult] = {}
    work = copy.deepcopy(layer).to(device=device, dtype=dtype)
    dense = copy.deepcopy(work) if dense_hidden is not None else None
    stash: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for pair in pairs:
        n_remove = budget.n_remove[pair.name]
        if n_remove == 0:
            continue
        stash = [] if residual and pair.name == "ffn" else None
        folds = consumer_stats(work, pair.consumer, hidden, layer_kwargs, dense, dense_hidden,
                               ones=pair.name in biased, residual=residual, stash=stash)
        if not all(torch.isfinite(t).all() for t in folds[0] + folds[1] if t is not None):
            raise FaspxError(
                f"layer {index} produced NaN/Inf activations at the input of {pair.consumer}; "
                "try --dtype float32"
            )
        results[pair.name] = prune_pair(layer, pair, folds, n_remove, index, method, with_bias=pair.name in biased)
        if stash is None:
            work = copy.deepcopy(layer).to(device=device, dtype=dtype)
    if stash is not None:
        ffn = next(p for p in pairs if p.name == "ffn")
        keep_cols = kept_columns(torch.tensor(results["ffn"].keep), ffn.col_unit)
        advance_stashed(layer.get_submodule(ffn.consumer), keep_cols if ffn.physical else None, stash, hidden,
                        device=device, dtype=dtype)
    else:
        advance(work, hidden, layer_kwargs, device)
    advance(dense, dense_hidden or [], layer_kwargs, device)
    return results


def stash_bytes(hidden: list[torch.Tensor], ffn_width: int) -> int:
    """Bytes that the FFN's residual and consumer inputs of every sample take (``prune_layer``)."""
    return sum(h.numel() // h.shape[-1] * (h.shape[-1] + ffn_width) * h.element_size() for h in hidden)


def stash_fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` more fit where the layer activations are kept: under a third of the GPU's
    free memory, or under half of the host's free memory (False where that can't be read)."""
    if device.type == "cuda":
        return nbytes < torch.cuda.mem_get_info(device)[0] / 3
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return False
    return nbytes < free / 2


def advance_stashed(consumer: nn.Module, keep_cols: torch.Tensor | None, stash: list[tuple[torch.Tensor, torch.Tensor]],
                    hidden: list[torch.Tensor], *, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every hidden state by residual + restored consumer(its kept input columns), ``stash``
    holding (residual, consumer input) per sample; ``keep_cols`` None reads every column."""
    consumer = copy.deepcopy(consumer).to(device=device, dtype=dtype)
    for j, (res, x_in) in enumerate(stash):
        x_in = x_in.to(device)
        if keep_cols is not None:
            x_in = x_in[..., keep_cols.to(device)]
        out = res.to(device) + consumer(x_in)
        hidden[j] = out.reshape(hidden[j].shape).to(hidden[j].device)
    stash.clear()


def advance(layer: nn.Module, stream: list[torch.Tensor], layer_kwargs: dict, device: torch.device) -> None:
    """Replace every hidden state in ``stream`` by ``layer``'s output on it (kept where it was stored)."""
    for j, x in enumerate(stream):
        out = layer(x.to(device), **layer_kwargs)
        stream[j] = (out[0] if isinstance(out, tuple) else out).to(x.device)


def choose_split(layers: nn.ModuleList, hidden: list[torch.Tensor], layer_kwargs: dict, pairs: list[Pair],
                 options: list[Budget], method: Method, *, device: torch.device, dtype: torch.dtype,
                 progress: bool = True) -> tuple[Budget, list[dict]]:
    """``--structure auto``: the split of ``options`` that moves the last layer's output least.

    Each layer's own reconstruction error misleads here: on SmolLM2-135M it favours removing V/O
    channels, whose damage grows downstream (README, Accuracy). So every candidate is judged end to
    end on the first AUTO_SAMPLES calibration samples: units are chosen as ``method`` chooses them
    (on the dense inputs) and removed without restoration (a cheap pass), and the last layer's output
    is compared with the dense model's. Returns the best budget and every candidate's relative error.
    """
    dense = [h.clone() for h in hidden[:AUTO_SAMPLES]]
    keeps: list[dict[tuple[str, int], torch.Tensor]] = []
    for layer in tqdm(layers, desc="auto split: dense pass", unit="layer", disable=not progress):
        work = copy.deepcopy(layer).to(device=device, dtype=dtype)
        keeps.append({})
        for pair in pairs:
            folds = consumer_stats(work, pair.consumer, dense, layer_kwargs)
            gram = (folds[0] + folds[1]).gram
            weight = work.get_submodule(pair.consumer).weight.to(device=gram.device, dtype=torch.float64)
            for n in {b.n_remove[pair.name] for b in options} - {0}:
                keeps[-1][pair.name, n] = choose_keep(weight, gram, pair, n, method)
        advance(work, dense, layer_kwargs, device)
    dense_energy = sum(float(x.float().pow(2).sum()) for x in dense) or 1.0
    errors = []
    for budget in tqdm(options, desc="auto split: candidates", unit="split", disable=not progress):
        stream = [h.clone() for h in hidden[:AUTO_SAMPLES]]
        for layer, keep in zip(layers, keeps, strict=True):
            work = copy.deepcopy(layer).to(device=device, dtype=dtype)
            for pair in pairs:
                n = budget.n_remove[pair.name]
                if n:
                    keep_units = keep[pair.name, n]
                    keep_cols = kept_columns(keep_units, pair.col_unit.to(keep_units.device))
                    write_pair(work, pair, keep_units, keep_cols,
                               work.get_submodule(pair.consumer).weight.data[:, keep_cols.to(device)])
            advance(work, stream, layer_kwargs, device)
        diff = sum(float((y.float() - x.float()).pow(2).sum()) for y, x in zip(stream, dense, strict=True))
        errors.append(diff / dense_energy)
    best = min(range(len(options)), key=errors.__getitem__)
    splits = [{"n_remove": dict(b.n_remove), "error": errors[k], "chosen": k == best} for k, b in enumerate(options)]
    return options[best], splits


def choose_keep(weight: torch.Tensor, gram: torch.Tensor, pair: Pair, n_remove: int, method: Method) -> torch.Tensor:
    """The units of ``pair`` to keep: by the structured Wanda score, or by structured OBS."""
    col_unit = pair.col_unit.to(gram.device)
    if method.selection == "obs":
        return select_obs(weight, gram, col_unit, n_remove,
                          damp=max(method.damp if method.damp != "auto" else 0.0, MIN_RETRY_DAMP))
    return select(score(weight, gram.diagonal(), col_unit, int(pair.col_unit.max()) + 1), n_remove)


def consumer_input(layer: nn.Module, consumer: str, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """The (tokens x in_features) float32 input of ``consumer`` when ``layer`` runs on ``x``.

    The forward stops once the consumer has seen its input: the rest of the layer is not needed.
    """
    (x_in,) = module_inputs(layer, (consumer,), x, layer_kwargs)
    return x_in.reshape(-1, layer.get_submodule(consumer).in_features).float()


def module_inputs(layer: nn.Module, names: tuple[str, ...], x: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
    """The first inputs of the modules ``names`` when ``layer`` runs on ``x``, as they were (shape, dtype).

    The forward stops once the last of ``names`` has seen its input (they must run in that order).
    """
    seen: list[torch.Tensor] = []

    def grab(_module, args):
        seen.append(args[0])
        if len(seen) == len(names):
            raise _Stop

    handles = [layer.get_submodule(name).register_forward_pre_hook(grab) for name in names]
    try:
        layer(x.to(layer.get_submodule(names[-1]).weight.device), **layer_kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def consumer_stats(layer: nn.Module, consumer: str, hidden: list[torch.Tensor], layer_kwargs: dict,
                   dense: nn.Module | None = None, dense_hidden: list[torch.Tensor] | None = None,
                   ones: bool = False, residual: str | None = None,
                   stash: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[Stats]:
    """Accumulate the Stats of ``consumer`` (float64) in two folds (even and odd samples); their sum
    is the whole calibration set, and each fold can check a damping fitted on the other.

    ``ones`` appends a constant input (the last row/column of every moment), so that a restoration
    can solve for a bias together with the weights. With ``stash`` (a list; ``residual`` must name a
    module that runs before the consumer), the inputs of both are appended to it per sample, kept
    where that sample's hidden state is.
    """
    n = layer.get_submodule(consumer).in_features + int(ones)
    device = layer.get_submodule(consumer).weight.device

    def zeros():
        return torch.zeros(n, n, dtype=torch.float64, device=device)

    folds = [Stats(zeros(), *((zeros(), zeros()) if dense is not None else ())) for _ in range(2)]
    for j, x in enumerate(hidden):
        stats = folds[j % 2]
        if stash is not None:
            res, x_in = module_inputs(layer, (residual, consumer), x, layer_kwargs)
            stash.append((res.to(x.device), x_in.to(x.device)))
            x_in = x_in.reshape(-1, n - int(ones)).float()
        else:
            x_in = consumer_input(layer, consumer, x, layer_kwargs)
        x_pruned = with_ones(x_in, ones)
        if dense is not None:  # the dense layer runs outside the scope of exact_bf16_products
            x_dense = with_ones(consumer_input(dense, consumer, dense_hidden[j], layer_kwargs), ones)
        with exact_bf16_products(layer.get_submodule(consumer)):
            add_gram(stats.gram, x_pruned)
            if dense is not None:
                stats.cross.add_(x_pruned.T @ x_dense)
                add_gram(stats.gram_target, x_dense)
    return folds


@contextlib.contextmanager
def exact_bf16_products(consumer: nn.Module):
    """Within, when ``consumer`` is a bfloat16 module on the CPU: float32 matrix products run on the
    CPU's bfloat16 units (oneDNN), with float32 sums.

    For the Gram of that consumer's inputs, which hold bfloat16 values (float32 tensors made from its
    bfloat16 inputs): their products are exact in float32 and the sums stay float32, so the Gram is as
    accurate as the plain float32 product (more, in a test: 3.6e-7 vs 1e-6 relative) and about 3x
    faster where the CPU has AMX. Other operands would be rounded to bfloat16, hence the scope.
    """
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    enabled = consumer.weight.dtype == torch.bfloat16 and consumer.weight.device.type == "cpu"
    if not enabled or matmul is None or not hasattr(matmul, "fp32_precision"):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def with_ones(x: torch.Tensor, ones: bool) -> torch.Tensor:
    """``x`` (tokens x n) with a column of ones appended when ``ones``."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if ones else x


def prune_pair(layer: nn.Module, pair: Pair, folds: list[Stats], n_remove: int, index: int,
               method: Method = Method(), with_bias: bool = False) -> PairResult:
    """Choose the kept units of one pair, restore its consumer, and write the result into ``layer``.

    ``damp="auto"`` picks the damping per matrix: the candidate whose restoration, fitted on one
    fold of the calibration samples, reproduces the other fold best. With ``with_bias`` the moments
    carry a constant input last, and the bias is restored with the weights as one more column.
    """
    gram, cross, gram_target = folds[0] + folds[1]
    consumer = layer.get_submodule(pair.consumer)
    weight = consumer.weight.data.to(device=gram.device, dtype=torch.float64)
    n = weight.shape[1]
    n_units = int(pair.col_unit.max()) + 1
    gram_in = gram[:n, :n]  # selection looks at the inputs only
    keep = choose_keep(weight, gram_in, pair, n_remove, method)
    keep_cols = kept_columns(keep, pair.col_unit.to(gram.device))
    if with_bias:
        # Scale the constant input to the inputs' RMS, so it neither dominates the relative damping
        # nor gets swamped by it; the bias column is scaled inversely and back at the end.
        unit = float((gram_in.diagonal().mean() / gram[n, n]).sqrt()) or 1.0
        folds = [f.scale_last(unit) for f in folds]
        gram, cross, gram_target = folds[0] + folds[1]
        bias = consumer.bias.data if consumer.bias is not None else weight.new_zeros(weight.shape[0])
        weight = torch.cat([weight, bias.to(weight).unsqueeze(1) / unit], dim=1)
        keep_cols = torch.cat([keep_cols, keep_cols.new_tensor([n])])
    damp = method.damp
    if damp == "auto" and method.restore:
        damp = choose_damp(weight, folds, keep_cols)

    def error(new_cols: torch.Tensor) -> float:
        full = torch.zeros_like(weight)
        full[:, keep_cols] = new_cols
        return reconstruction_error(weight, full, gram, cross, gram_target) / total

    target = gram if gram_target is None else gram_target
    total = float(((weight @ target) * weight).sum()) or 1.0
    new_cols = weight[:, keep_cols]
    result = PairResult(keep=keep.tolist(), n_units=n_units, err_removed=error(new_cols))
    if method.restore:
        for attempt in range(DAMP_RETRIES):
            result.damp = damp if attempt == 0 else max(damp, MIN_RETRY_DAMP) * 10**attempt
            restored = restore(weight, gram, keep_cols, result.damp, cross)
            if restored is not None:
                break
        else:
            raise FaspxError(
                f"layer {index}: restoring {pair.consumer} failed (not positive definite or "
                f"non-finite) even with damping {result.damp:g}; try --no-restore or --dtype float32"
            )
        result.err_restored = error(restored)
        # A restoration that raises the layer's error is not accepted (unless the guard is off).
        if result.err_restored <= result.err_removed or not method.guard:
            new_cols, result.restored = restored, True
        else:
            log.warning("layer %d %s: restoration raised the error (%.4g > %.4g); kept plain removal",
                        index, pair.name, result.err_restored, result.err_removed)
    if with_bias:
        write_pair(layer, pair, keep, keep_cols[:-1], new_cols[:, :-1], new_bias=new_cols[:, -1] * unit)
    else:
        write_pair(layer, pair, keep, keep_cols, new_cols)
    return result


def write_pair(layer: nn.Module, pair: Pair, keep: torch.Tensor, keep_cols: torch.Tensor,
               new_cols: torch.Tensor, new_bias: torch.Tensor | None = None) -> None:
    """Put the kept rows/columns back into ``layer``: cut out (physical pairs) or zeroed at full width."""
    consumer = layer.get_submodule(pair.consumer)
    master = consumer.weight
    if new_bias is not None:
        consumer.bias = nn.Parameter(new_bias.to(device=master.device, dtype=master.dtype), requires_grad=False)
    keep = keep.to(master.device)
    keep_cols = keep_cols.to(master.device)
    new_cols = new_cols.to(device=master.device, dtype=master.dtype)
    if pair.physical:
        consumer.weight = nn.Parameter(new_cols.contiguous(), requires_grad=False)
        consumer.in_features = len(keep_cols)
        for name in pair.producers:
            producer = layer.get_submodule(name)
            producer.weight = nn.Parameter(producer.weight.data[keep].contiguous(), requires_grad=False)
            if producer.bias is not None:
                producer.bias = nn.Parameter(producer.bias.data[keep].contiguous(), requires_grad=False)
            producer.out_features = len(keep)
        return
    full = torch.zeros_like(master.data)
    full[:, keep_cols] = new_cols
    master.data.copy_(full)
    for name in pair.producers:
        producer = layer.get_submodule(name)
        drop = torch.ones(producer.out_features, dtype=torch.bool, device=master.device)
        drop[keep] = False
        producer.weight.data[drop] = 0
        if producer.bias is not None:
            producer.bias.data[drop] = 0


def enable_bias(model: nn.Module, adapter: Adapter, pair: str) -> None:
    """After bias-aware restoration gave ``pair``'s consumers a bias: switch on the stock config field
    that declares it, and give zero biases to the other modules that field governs, so the saved
    checkpoint loads in stock transformers as it is in memory."""
    field = adapter.bias_field(model.config, pair)
    if field is None:
        return  # the consumers had biases already
    name, modules = field
    setattr(model.config, name, True)
    for layer in adapter.layers(model):
        for path in modules:
            module = layer.get_submodule(path)
            if module.bias is None:
                module.bias = nn.Parameter(module.weight.new_zeros(module.out_features), requires_grad=False)


def set_ffn_width(model: nn.Module, adapter: Adapter) -> int:
    """Write the pruned FFN width into the config (one width for every layer, as stock models need)."""
    widths = {layer.get_submodule(adapter.ffn_consumer).in_features for layer in adapter.layers(model)}
    if len(widths) != 1:
        raise FaspxError(f"layers ended with different FFN widths {sorted(widths)}; a stock config needs one")
    (width,) = widths
    setattr(model.config, adapter.ffn_width_key, width)
    return width

"""The pruning driver: walk the decoder layers one at a time, solve each pair, write it back.

Per layer (design.md): gather G at the attention consumer's input, solve and write the V/O pair;
gather G at the FFN consumer's input with the pruned attention in place, solve and write the FFN
pair; advance the stream through the pruned layer. The stream (``faspx.stream``), the pair solve
(``faspx.solve``) and the write-back (``faspx.writeback``) are the three pieces; the driver and both
searches (``choose_split`` for ``structure="auto"``, ``choose_widths`` for ``ffn_widths="per-layer"``)
are their clients. Only the layer being pruned is on the device, in the forward dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from faspx.adapters import Adapter, Pair, adapter_for
from faspx.budget import Budget, candidates, plan
from faspx.checkpoint import Checkpoint
from faspx.depth import remove_attention, search_attention
from faspx.errors import FaspxError, UsageError
from faspx.recipes import Recipe, get_recipe
from faspx.restore import reconstruction_error
from faspx.solve import PairSolution, solve_pair
from faspx.stream import Stream
from faspx.widths import allocate, candidate_removals
from faspx.writeback import set_ffn_width, write_pair

log = logging.getLogger("faspx")

# structure="auto" judges each candidate split on this many calibration samples.
AUTO_SAMPLES = 8
# ffn_widths="per-layer" measures each layer's error curves on the first calibration samples holding
# this many tokens (and at least 4 per FFN channel, so that the Gram is well sampled).
WIDTH_TOKENS = 16384


@dataclass
class PairResult:
    """What happened to one pair of one layer; errors are ||W'X - WX||^2 / ||WX||^2."""

    keep: list[int]
    n_units: int
    err_removed: float | None = 0.0
    err_restored: float | None = None
    damp: float | None = None
    restored: bool = False

    @classmethod
    def of(cls, solution: PairSolution, n_units: int) -> PairResult:
        """The JSON-ready record of a solve."""
        return cls(solution.keep.tolist(), n_units, solution.err_removed, solution.err_restored, solution.damp,
                   solution.restored)


@dataclass
class PruneReport:
    """Everything ``prune`` did: the recipe, the plan, per-layer kept units and errors, the output form."""

    sparsity: float
    recipe: dict
    n_remove: dict[str, int]
    removed_fraction: float
    device: str
    dtype: str
    n_calib: int
    seqlen: int
    # stock (one FFN width: stock transformers classes) or nemotron-nas (per-layer widths)
    form: str = "stock"
    layers: list[dict[str, PairResult]] = field(default_factory=list)
    seconds: float = 0.0
    # structure="auto": every candidate split ({"n_remove", "error", "chosen"})
    splits: list[dict] | None = None
    # ffn_widths="per-layer": each layer's FFN width, and each layer's measured error per candidate width
    layer_widths: list[int] | None = None
    width_errors: dict | None = None
    # structure="2ssp": the layers whose attention was removed (in the order chosen), and each step of
    # the search ({"removed", "ppl", "candidates": {layer: calibration ppl}})
    attention_removed: list[int] | None = None
    depth_search: list[dict] | None = None
    depth_seconds: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict (fasp.json records it under ``prune``)."""
        return asdict(self)

def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when it is there, else the CPU; ``cpu``, ``cuda`` and ``cuda:N``
    are checked against what is visible (UsageError).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
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
    recipe: Recipe | str | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> PruneReport:
    """Prune ``model`` in place with ``recipe`` (default: ``quality``) and return what was done.

    ``calib_ids`` is a (samples x seqlen) LongTensor of calibration tokens. This is the one-shot part
    of the recipe (structure, selection, restoration, FFN widths); its distillation needs the dense
    model as a teacher and runs after this (``faspx.distill``, or ``faspx.pipeline.prune_model``,
    which does both). The FFN pair shrinks physically (the config's FFN width is updated); the V/O
    pair is zeroed at full width so that the result stays a stock transformers model. With per-layer
    FFN widths, or with structure ``2ssp`` (whole attention submodules removed after the FFN walk,
    ``faspx.depth``; LLaMA only), the report's ``form`` is ``nemotron-nas``: faspx.exporters.hf writes
    it in the form vLLM serves. With ``checkpoint`` (``faspx.checkpoint``) every pruned layer is saved, and a
    prune that finds one continues after its last saved layer, to the same bytes.

    Example:
        >>> import torch; from transformers import AutoModelForCausalLM, OPTConfig
        >>> cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        ...                 vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)
        >>> model = AutoModelForCausalLM.from_config(cfg).eval()
        >>> report = prune(model, torch.randint(0, 100, (4, 16)), 0.2, "paper", progress=False)
        >>> model.config.ffn_dim < 64
        True
    """
    recipe = get_recipe(recipe)
    adapter = adapter_for(model.config)
    budget = plan(model, adapter, sparsity, recipe.structure, recipe.alpha)
    check_ffn_widths(model.config, adapter, recipe)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    pairs = adapter.pairs(model.config)
    report = PruneReport(
        sparsity=sparsity, recipe=recipe.to_dict(), n_remove=dict(budget.n_remove),
        removed_fraction=budget.removed_fraction, device=str(device), dtype=str(dtype).removeprefix("torch."),
        n_calib=int(calib_ids.shape[0]), seqlen=int(calib_ids.shape[1]),
    )
    if recipe.structure == "2ssp":
        report.attention_removed = []
    start = time.perf_counter()
    if all(n == 0 for n in budget.n_remove.values()) and not budget.depth:
        return report

    layers = adapter.layers(model)
    stream = Stream.capture(model, layers, calib_ids, device, dtype)
    state = checkpoint.state() if checkpoint is not None else None
    if state is not None:
        start_layer, layer_budgets, residual = _resume(checkpoint, adapter, layers, stream, budget, report)
    else:
        start_layer = 0
        if budget.depth and recipe.sequential:  # the walk then solves each FFN for the model it will be in
            _remove_depth(model, adapter, calib_ids, budget, recipe, device, dtype, report, progress)
        layer_budgets, residual = _plan_layers(model, adapter, layers, stream, pairs, budget, sparsity, recipe, report,
                                               progress)
    bar = tqdm(range(len(layers)), desc="pruning layers", unit="layer", disable=not progress, initial=start_layer)
    try:
        for i in range(start_layer, len(layers)):
            results = prune_layer(layers[i], stream, pairs, layer_budgets[i], recipe, index=i, residual=residual)
            report.layers.append({p: PairResult.of(s, budget.units[p]) for p, s in results.items()})
            bar.update(1)
            bar.set_postfix({p: f"{s.err_restored if s.restored else s.err_removed or 0:.3g}"
                             for p, s in results.items()})
            log.info("layer %d: %s", i, ", ".join(
                f"{p} kept {len(s.keep)}" + (f" err {s.err_removed:.4g}" if s.err_removed is not None else "")
                + (f" -> {s.err_restored:.4g}" if s.err_restored is not None else "")
                for p, s in results.items()))
            if checkpoint is not None:
                checkpoint.save(i + 1, layers[i], stream.hidden, {
                    "residual": residual, "layer_n_remove": [b.n_remove for b in layer_budgets],
                    "report": report.to_dict()})
    except KeyboardInterrupt:
        if checkpoint is not None and checkpoint.state() is not None:
            log.warning("%d of %d layers are pruned and saved in %s: run the same command with --resume to go on",
                        checkpoint.state()["done"], len(layers), checkpoint.directory)
        raise
    finally:
        bar.close()
    if budget.depth and not recipe.sequential:
        _remove_depth(model, adapter, calib_ids, budget, recipe, device, dtype, report, progress)
    widths = adapter.ffn_widths(model)
    if len(set(widths)) > 1:
        report.form, report.layer_widths = "nemotron-nas", widths
        # In memory the config keeps one width (the largest); faspx.exporters.hf writes the per-layer ones.
        setattr(model.config, adapter.ffn_width_key, max(widths))
    else:
        set_ffn_width(model, adapter)
        report.layer_widths = widths if recipe.ffn_widths == "per-layer" else None
    report.seconds = time.perf_counter() - start
    return report


def _remove_depth(model: nn.Module, adapter: Adapter, calib_ids: torch.Tensor, budget: Budget, recipe: Recipe,
                  device: torch.device, dtype: torch.dtype, report: PruneReport, progress: bool) -> None:
    """Structure 2ssp: remove ``budget.depth`` attention submodules, searched by perplexity on the first
    ``recipe.depth_samples`` calibration samples (``faspx.depth``), and record it in ``report``.

    2SSP as published (not ``recipe.sequential``) searches after the FFN walk, on the FFN-pruned
    model; a sequential recipe searches first, on the dense model, so that the walk's restoration
    fits each FFN to the inputs it will get once the attention is gone."""
    start = time.perf_counter()
    samples = calib_ids[:recipe.depth_samples]
    log.info("removing %d attention submodules, searched by perplexity on %d calibration sample(s)",
             budget.depth, len(samples))
    report.attention_removed, report.depth_search = search_attention(model, adapter, samples, budget.depth,
                                                                     device, dtype, progress=progress)
    report.depth_seconds = time.perf_counter() - start
    report.form = "nemotron-nas"


def _plan_layers(model: nn.Module, adapter: Adapter, layers: nn.ModuleList, stream: Stream, pairs: list[Pair],
                 budget: Budget, sparsity: float, recipe: Recipe, report: PruneReport,
                 progress: bool) -> tuple[list[Budget], str | None]:
    """The decisions taken before the walk: how each layer advances the stream, the split (structure
    auto) and each layer's budget (per-layer widths). Recorded in ``report``."""
    # Where the FFN's output is the last addition to the residual stream, the layer's next inputs are
    # made from the FFN statistics pass (residual + restored consumer) instead of a rerun of the layer.
    residual = adapter.ffn_residual_input(model.config)
    if residual and not stream.stash_fits(budget.units["ffn"]):
        log.info("the FFN inputs of %d samples do not fit in memory: every layer is rerun to advance",
                 len(stream.hidden))
        residual = None
    if recipe.structure == "auto":
        budget, report.splits = choose_split(layers, stream, pairs, candidates(model, adapter, sparsity), recipe,
                                             residual=residual, progress=progress)
        report.n_remove, report.removed_fraction = dict(budget.n_remove), budget.removed_fraction
        log.info("structure auto chose %s", ", ".join(f"{p} {n} units" for p, n in budget.n_remove.items()))
    layer_budgets = [budget] * len(layers)
    if recipe.ffn_widths == "per-layer" and budget.n_remove["ffn"] > 0:
        layer_budgets, report.width_errors = choose_widths(layers, stream, pairs, budget, recipe, progress=progress)
        report.removed_fraction = sum(b.removed_fraction for b in layer_budgets) / len(layers)
        log.info("per-layer FFN widths: %s", [budget.units["ffn"] - b.n_remove["ffn"] for b in layer_budgets])
    return layer_budgets, residual


def _resume(checkpoint: Checkpoint, adapter: Adapter, layers: nn.ModuleList, stream: Stream, budget: Budget,
            report: PruneReport) -> tuple[int, list[Budget], str | None]:
    """Load a checkpoint into the layers, the stream and the report: where to go on, each layer's budget,
    and how layers advance the stream (the decisions of the interrupted run, not taken again)."""
    state = checkpoint.load(layers, stream.hidden)
    saved = state["report"]
    for name in ("n_remove", "removed_fraction", "splits", "width_errors", "attention_removed", "depth_search",
                 "depth_seconds", "form"):
        setattr(report, name, saved.get(name, getattr(report, name)))
    for i in report.attention_removed or []:
        remove_attention(layers[i], adapter, i)
    report.layers = [{p: PairResult(**r) for p, r in layer.items()} for layer in saved["layers"]]
    layer_budgets = [dataclasses.replace(budget, n_remove=n) for n in state["layer_n_remove"]]
    log.info("resuming from %s: layers 0-%d are pruned already", checkpoint.directory, state["done"] - 1)
    return state["done"], layer_budgets, state["residual"]


def check_ffn_widths(config, adapter: Adapter, recipe: Recipe) -> None:
    """UsageError unless the model can take the recipe's FFN widths (cheap: config only)."""
    if recipe.ffn_widths == "uniform":
        return
    if config.model_type not in adapter.per_layer_types:
        raise UsageError(
            f"per-layer FFN widths export in the nemotron-nas (DeciLM) form, which has LLaMA's layer: model "
            f"type {config.model_type!r} cannot take it (supported: llama); use --ffn-widths uniform"
        )
    if len(candidate_removals(getattr(config, adapter.ffn_width_key))) < 2:
        raise UsageError(
            f"per-layer FFN widths need an FFN width of at least 512 (widths are multiples of 256); "
            f"this model's is {getattr(config, adapter.ffn_width_key)}; use --ffn-widths uniform"
        )


@torch.no_grad()
def prune_layer(layer: nn.Module, stream: Stream, pairs: list[Pair], budget: Budget, recipe: Recipe, *,
                index: int = 0, residual: str | None = None) -> dict[str, PairSolution]:
    """Prune the pairs of one layer in order (solve, write back), then advance ``stream`` through it.

    With ``residual`` (``Adapter.ffn_residual_input``) and the FFN pair pruned, the FFN statistics pass
    keeps that module's input and the consumer's input of every sample, and the next inputs are their
    sum through the restored consumer: the same as rerunning the pruned layer, for one matrix product.
    Without ``recipe.sequential`` the statistics of every pair and the stream's next inputs are the
    dense layer's (2SSP's first stage, which scores all layers on the dense model).
    """
    results: dict[str, PairSolution] = {}
    work = stream.on_device(layer)
    dense = None if recipe.sequential else work
    stash: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for pair in pairs:
        n_remove = budget.n_remove[pair.name]
        if n_remove == 0:
            continue
        stash = [] if residual and pair.name == "ffn" and recipe.sequential else None
        moments = stream.consumer_stats(work, pair.consumer, residual=residual, stash=stash,
                                        gram=recipe.restore or recipe.selection != "norm")
        if not all(torch.isfinite(f).all() for f in [*moments.folds, moments.column_norms]):
            raise FaspxError(
                f"layer {index} produced NaN/Inf activations at the input of {pair.consumer}; try --dtype float32"
            )
        weight = layer.get_submodule(pair.consumer).weight.data.to(device=moments.column_norms.device,
                                                                  dtype=torch.float64)
        results[pair.name] = solve_pair(weight, moments.folds, pair.col_unit, n_remove, recipe,
                                        where=f"layer {index} {pair.name}", column_norms=moments.column_norms)
        write_pair(layer, pair, results[pair.name])
        if stash is None and recipe.sequential:
            work = stream.on_device(layer)
    if dense is not None:  # 2SSP as published: every layer's statistics come from the dense model
        stream.advance(dense)
    elif stash is not None:
        ffn = next(p for p in pairs if p.name == "ffn")
        stream.advance_stashed(layer.get_submodule(ffn.consumer), results["ffn"].keep_cols.cpu(), stash)
    else:
        stream.advance(work)
    return results


@torch.no_grad()
def choose_split(layers: nn.ModuleList, stream: Stream, pairs: list[Pair], options: list[Budget], recipe: Recipe,
                 *, residual: str | None = None, progress: bool = True) -> tuple[Budget, list[dict]]:
    """``structure="auto"``: the split of ``options`` that moves the last layer's output least, held out.

    Each layer's own reconstruction error misleads here: on SmolLM2-135M it favours removing V/O
    channels, whose damage grows downstream (docs/accuracy.md). So every candidate is pruned end to
    end, layer by layer with ``prune_layer`` (the solve that will then prune the model), fitted on the
    first AUTO_SAMPLES calibration samples; its last layer's output is compared with the dense model's
    on the next AUTO_SAMPLES samples (in-sample, a restoration fitted on few tokens looks better than
    it is). Returns the best budget and every candidate's relative error.
    """
    n_fit = min(AUTO_SAMPLES, max(1, len(stream.hidden) // 2))
    check_range = (n_fit, n_fit + AUTO_SAMPLES) if len(stream.hidden) > n_fit else (0, n_fit)
    dense = stream.part(*check_range)
    for layer in tqdm(layers, desc="auto split: dense pass", unit="layer", disable=not progress):
        dense.advance(dense.on_device(layer))
    dense_energy = dense.energy() or 1.0
    errors = []
    for budget in tqdm(options, desc="auto split: candidates", unit="split", disable=not progress):
        fit, check = stream.part(0, n_fit), stream.part(*check_range)
        for i, layer in enumerate(layers):
            trial = copy.deepcopy(layer)
            prune_layer(trial, fit, pairs, budget, recipe, index=i, residual=residual)
            check.advance(check.on_device(trial))
        errors.append(check.distance(dense) / dense_energy)
    best = min(range(len(options)), key=errors.__getitem__)
    splits = [{"n_remove": dict(b.n_remove), "error": errors[k], "chosen": k == best} for k, b in enumerate(options)]
    return options[best], splits


def width_errors(layer: nn.Module, stream: Stream, ffn: Pair, removals: list[int],
                 recipe: Recipe) -> tuple[list[float], dict[int, PairSolution]]:
    """One layer's error for each candidate FFN removal, and the solves behind them.

    The FFN is pruned to each width by ``solve_pair`` (as the driver would prune it), and the error is
    measured against the residual stream token by token: sum_t ||dW x_t||^2 / ||h_t||^2 (h_t: the
    layer's input). Measured against the layer's own output instead, layers whose FFN output is small
    next to the stream look cheap to cut, and the result is far worse (docs/accuracy.md).
    The stream is advanced through the unpruned layer.
    """
    work = stream.on_device(layer)
    moments = stream.consumer_stats(work, ffn.consumer, stream_weighted=True)
    # the master weight, as prune_layer solves it (not the device copy in the forward dtype)
    weight = layer.get_submodule(ffn.consumer).weight.to(device=moments.folds[0].device, dtype=torch.float64)
    errors, solutions = [], {}
    for n_remove in removals:
        if n_remove == 0:
            errors.append(0.0)
            continue
        solutions[n_remove] = solve_pair(weight, moments.folds, ffn.col_unit, n_remove, recipe,
                                         where=f"width search, {n_remove} FFN channels",
                                         column_norms=moments.column_norms)
        new = solutions[n_remove].full_weight(weight.shape[1])
        errors.append(reconstruction_error(weight, new, moments.stream_gram))
    stream.advance(work)
    return errors, solutions


@torch.no_grad()
def choose_widths(layers: nn.ModuleList, stream: Stream, pairs: list[Pair], budget: Budget, recipe: Recipe, *,
                  progress: bool = True) -> tuple[list[Budget], dict]:
    """``ffn_widths="per-layer"``: each layer's FFN budget, sharing the uniform plan's total by error.

    The dense model runs over the first calibration samples holding WIDTH_TOKENS tokens (a fixed
    cost, not a share of the calibration set); every layer's FFN is solved at every allowed width
    (``width_errors``), and ``faspx.widths.allocate`` picks the widths with the least summed error.
    A pruned attention pair is left dense here. Returns the per-layer budgets and
    {"removals", "errors"} (errors[layer][candidate]).
    """
    ffn = next(p for p in pairs if p.name == "ffn")
    width = budget.units["ffn"]
    removals = candidate_removals(width)
    trial = stream.part(0, stream.samples_holding(max(WIDTH_TOKENS, 4 * width)))
    errors = torch.tensor([width_errors(layer, trial, ffn, removals, recipe)[0]
                           for layer in tqdm(layers, desc="per-layer widths: error curves", unit="layer",
                                             disable=not progress)], dtype=torch.float64)
    picks = allocate(errors, removals, len(layers) * budget.n_remove["ffn"])
    budgets = [dataclasses.replace(budget, n_remove={**budget.n_remove, "ffn": removals[k]}) for k in picks]
    return budgets, {"removals": removals, "errors": errors.tolist()}

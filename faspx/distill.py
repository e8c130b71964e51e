"""Short end-to-end distillation of the pruned model from the dense one, on calibration windows.

FASP and its options fit each layer to its own local target; on SmolLM2-135M they end within a few
percent of each other (README, Accuracy), while the loss that is left comes from small errors that
add up across 30 layers. A few steps of logit distillation (KL from the dense model's next-token
distribution, on the calibration text the pruning already read) fit the whole network at once. The
architecture and the widths are untouched, so the checkpoint stays stock.

Unlike the pruning, which holds one layer at a time on the device, this needs the whole pruned model
with its gradients and AdamW moments (about 4x its float32 size) and a copy of the dense model on the
device, so it is opt-in (``--distill N``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from faspx.errors import UsageError

log = logging.getLogger("faspx")

# Windows after the distilled ones that check the result (kept only if their KL fell).
HELD_OUT = 4


@dataclass
class DistillReport:
    """What ``distill`` did: KL (nats per token) on the first and last steps and on held-out windows."""

    samples: int
    lr: float
    seconds: float = 0.0
    kl_first: float = 0.0
    kl_last: float = 0.0
    held_out: int = 0
    kl_held_out_before: float | None = None
    kl_held_out_after: float | None = None
    accepted: bool = True

    def to_dict(self) -> dict:
        """A JSON-ready dict (fasp.json records it)."""
        return asdict(self)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions, in float32.

    Example:
        >>> logits = torch.randn(1, 5, 10)
        >>> float(kl_loss(logits, logits))
        0.0
    """
    student = student_logits.float().log_softmax(-1).flatten(0, -2)
    teacher = teacher_logits.float().log_softmax(-1).flatten(0, -2)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the embeddings and the LM head (large, and tied in many models)."""
    frozen = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        frozen |= {id(p) for p in head.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen and p.is_floating_point()]


def distill(student: nn.Module, teacher: nn.Module, calib_ids: torch.Tensor, samples: int, *,
            lr: float = 1e-4, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            progress: bool = True) -> DistillReport:
    """Train ``student`` in place to match ``teacher``'s next-token distributions on calibration windows.

    One AdamW step per window on the first ``samples`` rows of ``calib_ids``, the learning rate
    decaying linearly from ``lr`` to 0; the forwards run in ``dtype`` (autocast), the weights and the
    optimizer stay float32. Up to HELD_OUT windows after those check the result: where their KL did
    not fall, the weights before distillation are put back. ``teacher``'s weights are not changed.

    Example:
        >>> import copy; from transformers import AutoModelForCausalLM, LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, vocab_size=50)
        >>> teacher = AutoModelForCausalLM.from_config(cfg).eval(); student = copy.deepcopy(teacher)
        >>> distill(student, teacher, torch.randint(0, 50, (6, 16)), 2, progress=False).samples
        2
    """
    if not 1 <= samples <= calib_ids.shape[0]:
        raise UsageError(f"--distill must be between 1 and --nsamples ({calib_ids.shape[0]}), got {samples}")
    report = DistillReport(samples=samples, lr=lr)
    device = torch.device(device)
    start = time.perf_counter()
    home = next(student.parameters()).device
    params = trainable(student)
    check = calib_ids[samples:samples + HELD_OUT]
    report.held_out = int(check.shape[0])
    # The weights to put back if the check fails (no check, no copy: it is a whole model on the host).
    before = [p.detach().to("cpu", copy=True) for p in params] if report.held_out else []
    student.to(device)
    # A teacher already on the device in ``dtype`` is used as it is; any other is copied there (never moved).
    if any(p.device != device or p.dtype != dtype for p in teacher.parameters()):
        teacher = copy.deepcopy(teacher).to(device=device, dtype=dtype)
    teacher.eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    @torch.no_grad()
    def held_out_kl() -> float:
        total = 0.0
        for x in check:
            x = x.unsqueeze(0).to(device)
            with autocast:
                total += float(kl_loss(student(input_ids=x, use_cache=False).logits,
                                       teacher(input_ids=x, use_cache=False).logits))
        return total / len(check)

    if report.held_out:
        report.kl_held_out_before = held_out_kl()
    # Only the trained parameters need gradients (the frozen ones may come with requires_grad set).
    every = list(student.parameters())
    flags = [p.requires_grad for p in every]
    chosen = {id(p) for p in params}
    for p in every:
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / samples)
    losses = []
    bar = tqdm(calib_ids[:samples], desc="distilling", unit="window", disable=not progress)
    try:
        for x in bar:
            x = x.unsqueeze(0).to(device)
            with torch.no_grad():
                target = teacher(input_ids=x, use_cache=False).logits
            with autocast:
                logits = student(input_ids=x, use_cache=False).logits
            loss = kl_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        for p, flag in zip(every, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
        del optimizer
    report.kl_first, report.kl_last = losses[0], losses[-1]
    if report.held_out:
        report.kl_held_out_after = held_out_kl()
        if report.kl_held_out_after > report.kl_held_out_before:
            log.warning("distillation raised the held-out KL (%.4g > %.4g); kept the weights before it",
                        report.kl_held_out_after, report.kl_held_out_before)
            for p, saved in zip(params, before, strict=True):
                p.data.copy_(saved)
            report.accepted = False
    else:
        log.info("no calibration windows left after the %d distilled: the result is not checked held out", samples)
    student.to(home)
    report.seconds = time.perf_counter() - start
    log.info("distilled on %d windows in %.0fs: KL %.4g -> %.4g%s", samples, report.seconds, report.kl_first,
             report.kl_last, "" if not report.held_out else
             f", held out {report.kl_held_out_before:.4g} -> {report.kl_held_out_after:.4g}")
    return report

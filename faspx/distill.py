"""Short end-to-end distillation of the pruned model from the dense one, on calibration windows.

FASP and its options fit each layer to its own local target; on SmolLM2-135M they end within a few
percent of each other (docs/accuracy.md), while the loss that is left comes from small errors that
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
from faspx.recipes import STEP_TOKENS

log = logging.getLogger("faspx")

# Windows after the distilled ones that check the result (kept only if their KL fell).
HELD_OUT = 4
@dataclass
class DistillReport:
    """What ``distill`` did: KL (nats per token) on the first and last steps and on held-out windows."""

    samples: int
    lr: float
    step_tokens: int = STEP_TOKENS
    steps: int = 0
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


# Tokens whose logits exist at once in head_kl. The KL's elementwise work over a 49k vocabulary is
# memory-bound: on a 2-core CPU, head + softmax + gradient for 2048 tokens took 0.45 s in chunks of
# 64-128 tokens (the logits stay in cache), 0.68 s in chunks of 512, and the whole (2048 x vocab)
# float32 logits of the plain loss 1.4-4 s.
HEAD_CHUNK = 128


class _HeadKL(torch.autograd.Function):
    """Summed token KL from final hidden states; the gradient is made in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, student_weight, student_bias, teacher_weight, teacher_bias,
                chunk):
        ctx.hidden_dtype = student_hidden.dtype
        want_grad = ctx.needs_input_grad[0]
        student_rows = student_hidden.reshape(-1, student_hidden.shape[-1]).to(student_weight.dtype)
        teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(teacher_weight.dtype)
        grad = torch.empty(student_rows.shape, dtype=torch.float32, device=student_rows.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_rows.device)
        for start in range(0, student_rows.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_p = nn.functional.linear(teacher_rows[rows], teacher_weight, teacher_bias).float()
            log_p -= log_p.logsumexp(-1, keepdim=True)
            p = log_p.exp()
            s = nn.functional.linear(student_rows[rows], student_weight, student_bias).float()
            s -= s.logsumexp(-1, keepdim=True)  # log q
            # KL(p || q) = sum p (log p - log q), term by term: the expanded form
            # sum p log p - sum p s + logsumexp(s) subtracts sums of order log V to get a KL of 1e-4,
            # and its rounding then depends on the CPU's summation order.
            total += (p * (log_p - s)).sum()
            if want_grad:
                # d KL / d s = q - p, made in place in s
                s.exp_().sub_(p)
                grad[rows] = s.to(student_weight.dtype) @ student_weight
        if want_grad:
            ctx.save_for_backward(grad.reshape(student_hidden.shape))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None, None, None, None


def head_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Linear,
            teacher_head: nn.Linear, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student), the logits made ``chunk`` tokens at a time.

    ``student_hidden`` and ``teacher_hidden`` are final hidden states (what each model's LM head
    reads); only ``student_hidden`` gets a gradient, the heads stay fixed. Equals ``kl_loss`` on the
    full logits times the token count, but the (tokens x vocabulary) float32 logits never exist
    whole. Logits are computed in each head's dtype and reduced in float32.

    Example:
        >>> head = nn.Linear(8, 50, bias=False); hidden = torch.randn(1, 5, 8)
        >>> abs(float(head_kl(hidden, hidden, head, head))) < 1e-5
        True
    """
    def parts(head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return head.weight.detach(), None if head.bias is None else head.bias.detach()

    return _HeadKL.apply(student_hidden, teacher_hidden, *parts(student_head), *parts(teacher_head), chunk)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the embeddings and the LM head (large, and tied in many models)."""
    frozen = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        frozen |= {id(p) for p in head.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen and p.is_floating_point()]


def distill(student: nn.Module, teacher: nn.Module, calib_ids: torch.Tensor, samples: int, *,
            lr: float = 1e-4, step_tokens: int = STEP_TOKENS, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, progress: bool = True) -> DistillReport:
    """Train ``student`` in place to match ``teacher``'s next-token distributions on calibration windows.

    The first ``samples`` rows of ``calib_ids`` are cut into pieces of ``step_tokens`` tokens (a
    shorter last piece where the window does not divide), one AdamW step per piece, the learning rate
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
    if step_tokens < 1:
        raise UsageError(f"--distill-step-tokens must be at least 1, got {step_tokens}")
    pieces = [piece for window in calib_ids[:samples] for piece in window.split(step_tokens)]
    report = DistillReport(samples=samples, lr=lr, step_tokens=step_tokens, steps=len(pieces))
    device = torch.device(device)
    start = time.perf_counter()
    home = next(student.parameters()).device
    params = trainable(student)
    check_ids = calib_ids[samples:samples + HELD_OUT]
    report.held_out = int(check_ids.shape[0])
    # The weights to put back if the check fails (no check, no copy: it is a whole model on the host).
    before = [p.detach().to("cpu", copy=True) for p in params] if report.held_out else []
    student.to(device)
    # A teacher already on the device in ``dtype`` is used as it is; any other is copied there (never moved).
    if any(p.device != device or p.dtype != dtype for p in teacher.parameters()):
        teacher = copy.deepcopy(teacher).to(device=device, dtype=dtype)
    teacher.eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # The loss reads the models' final hidden states and applies the (frozen) LM heads itself, chunk by
    # chunk (head_kl); the student's head is cast to the forward dtype once, as autocast would at every step.
    student_body, teacher_body = student.base_model, teacher.base_model
    teacher_head = teacher.get_output_embeddings()
    student_head = student.get_output_embeddings()
    if student_head.weight.dtype != dtype:
        student_head = copy.deepcopy(student_head).to(dtype=dtype)

    def teacher_hidden(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher_body(input_ids=x, use_cache=False).last_hidden_state

    def mean_kl(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast:
            hidden = student_body(input_ids=x, use_cache=False).last_hidden_state
        return head_kl(hidden, target, student_head, teacher_head) / x.numel()

    # The teacher's side of the check is the same before and after: computed once.
    check = [(x, teacher_hidden(x)) for x in (x.unsqueeze(0).to(device) for x in check_ids)]

    @torch.no_grad()
    def held_out_kl() -> float:
        return sum(float(mean_kl(x, target)) for x, target in check) / len(check)

    if report.held_out:
        report.kl_held_out_before = held_out_kl()
    # Only the trained parameters need gradients (the frozen ones may come with requires_grad set).
    every = list(student.parameters())
    flags = [p.requires_grad for p in every]
    chosen = {id(p) for p in params}
    for p in every:
        p.requires_grad_(id(p) in chosen)
    # fused: one kernel for all parameters (0.08 s a step here for 107M float32 parameters, 0.30 s unfused)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(pieces))
    losses = []
    bar = tqdm(pieces, desc="distilling", unit="step", disable=not progress)
    try:
        for x in bar:
            x = x.unsqueeze(0).to(device)
            loss = mean_kl(x, teacher_hidden(x))
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
    log.info("distilled on %d windows (%d steps) in %.0fs: KL %.4g -> %.4g%s", samples, len(pieces), report.seconds,
             report.kl_first, report.kl_last, "" if not report.held_out else
             f", held out {report.kl_held_out_before:.4g} -> {report.kl_held_out_after:.4g}")
    return report

import copy

import pytest
import torch

from faspx.distill import HELD_OUT, distill, head_kl, kl_loss, trainable
from faspx.errors import UsageError
from faspx.prune import prune
from tests.conftest import calib, recipe, tiny_model


def test_kl_loss_is_the_mean_token_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert torch.allclose(kl_loss(student, teacher), expected, atol=1e-6)
    assert float(kl_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_head_kl_equals_kl_loss_and_its_gradient(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 40, bias=bias)
    student, teacher = torch.randn(1, 7, 6, requires_grad=True), torch.randn(1, 7, 6)
    expected = kl_loss(head(student), head(teacher)) * 7
    (expected_grad,) = torch.autograd.grad(expected, student)
    got = head_kl(student, teacher, head, head, chunk=3)  # 7 tokens: chunks of 3, 3, 1
    (grad,) = torch.autograd.grad(got, student)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    with torch.no_grad():  # no gradient asked: the value alone
        assert float(head_kl(student, teacher, head, head)) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_head_kl_from_hidden_states_is_the_kl_of_each_familys_logits(kind):
    # distill feeds head_kl the base model's last hidden state and the LM head: for every family
    # that must be exactly what the full model's logits are made from.
    teacher = sharp(tiny_model(kind))
    student = tiny_model(kind, seed=1)
    x = calib(1, 16, seed=2)
    with torch.no_grad():
        expected = kl_loss(student(input_ids=x).logits, teacher(input_ids=x).logits) * x.numel()
        got = head_kl(student.base_model(input_ids=x).last_hidden_state,
                      teacher.base_model(input_ids=x).last_hidden_state,
                      student.get_output_embeddings(), teacher.get_output_embeddings())
    assert float(got) == pytest.approx(float(expected), rel=1e-4)
    assert float(expected) > 0.01


def test_trainable_leaves_out_embeddings_and_head(kind):
    model = tiny_model(kind)
    chosen = {id(p) for p in trainable(model)}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert any("layers.0" in n and "norm" in n for n in names) or any("layer_norm" in n for n in names)
    assert {n for n, _ in model.named_parameters() if ".layers." in n} <= names


def sharp(model):
    """A random tiny model predicts a near-uniform distribution; a larger head gives the KL something to see."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    return model


def held_out_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(sum(kl_loss(student(input_ids=x[None]).logits, teacher(input_ids=x[None]).logits)
                         for x in ids)) / len(ids)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_distillation_brings_a_pruned_model_closer_to_the_dense_one(kind):
    # A random tiny model does not generalise from one random text to another, so every window
    # repeats one text: this checks that the loop fits its target and leaves the teacher alone.
    teacher = sharp(tiny_model(kind))
    ids = calib(1, 32, seed=3).repeat(12, 1)
    student = copy.deepcopy(teacher)
    prune(student, ids, 0.5, recipe("paper", structure="mlp", restore=False), progress=False)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    embeddings = student.get_input_embeddings().weight.clone()
    before = held_out_kl(student, teacher, ids[8:])
    report = distill(student, teacher, ids, 8, lr=1e-4, progress=False)
    after = held_out_kl(student, teacher, ids[8:])
    assert report.accepted and report.held_out == HELD_OUT
    assert after < 0.8 * before
    assert report.kl_held_out_after == pytest.approx(after, rel=1e-3)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert torch.equal(student.get_input_embeddings().weight, embeddings)
    assert all(p.grad is None for p in student.parameters())


def test_a_distillation_that_raises_the_held_out_kl_is_undone():
    teacher = sharp(tiny_model("llama"))
    student = copy.deepcopy(teacher)
    ids = calib(8, 32)
    prune(student, ids, 0.3, recipe("paper", structure="mlp"), progress=False)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    report = distill(student, teacher, ids, 4, lr=10.0, progress=False)  # diverges
    assert not report.accepted
    assert report.kl_held_out_after > report.kl_held_out_before
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_distill_checks_the_number_of_windows():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="between 1 and"):
        distill(model, model, calib(4, 16), 5, progress=False)


def test_steps_of_fewer_tokens_are_steps_on_the_pieces_of_each_window():
    # Two 32-token windows in steps of 16 tokens train exactly as four 16-token windows, one step each.
    teacher = sharp(tiny_model("llama"))
    ids = calib(2, 32, seed=5)
    split, whole = copy.deepcopy(teacher), copy.deepcopy(teacher)
    for student in (split, whole):
        prune(student, ids, 0.3, recipe("paper", structure="mlp", restore=False), progress=False)
    report = distill(split, teacher, ids, 2, lr=1e-3, step_tokens=16, progress=False)
    pieces = distill(whole, teacher, ids.reshape(4, 16), 4, lr=1e-3, step_tokens=16, progress=False)
    assert report.steps == pieces.steps == 4 and report.step_tokens == 16
    assert report.kl_first == pytest.approx(pieces.kl_first) and report.kl_last == pytest.approx(pieces.kl_last)
    assert all(torch.allclose(a, b) for a, b in zip(split.parameters(), whole.parameters(), strict=True))
    # A window that the step length does not divide ends in a shorter step.
    assert distill(copy.deepcopy(split), teacher, ids, 2, step_tokens=20, progress=False).steps == 4


def test_distill_checks_the_step_length():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="at least 1"):
        distill(model, model, calib(4, 16), 2, step_tokens=0, progress=False)


def test_distilling_every_window_leaves_nothing_to_check():
    teacher = sharp(tiny_model("llama"))
    student = copy.deepcopy(teacher)
    report = distill(student, teacher, calib(4, 16), 4, progress=False)
    assert report.held_out == 0 and report.kl_held_out_before is None and report.accepted


def test_head_kl_of_nearly_equal_distributions_is_accurate_in_float32():
    """A pruned model's KL to its teacher is ~1e-4 nats per token over a large vocabulary. In float32
    the result must still be within 1e-3 of the float64 value: a formula that subtracts sums of order
    log V would lose that to rounding (and how much would depend on the CPU's summation order)."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 49152, bias=False)  # SmolLM2's vocabulary
    with torch.no_grad():
        head.weight.copy_(torch.randn(49152, 64, generator=gen) * 4.0)
    teacher = torch.randn(1, 256, 64, generator=gen)
    student = teacher + 3e-3 * torch.randn(1, 256, 64, generator=gen)
    head64 = copy.deepcopy(head).double()
    log_p = head64(teacher.double()).log_softmax(-1)
    exact = float((log_p.exp() * (log_p - head64(student.double()).log_softmax(-1))).sum())
    assert 1e-4 < exact / 256 < 1e-2  # the regime of a well-restored pruned model
    with torch.no_grad():
        got = float(head_kl(student, teacher, head, head))
    # (measured here: the term-by-term form within 3e-5 of float64, the expanded one 1.5e-2 off)
    assert got == pytest.approx(exact, rel=1e-3)

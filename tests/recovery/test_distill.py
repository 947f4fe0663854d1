import math

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM

from lit_prune.functional import next_token_kl
from lit_prune.recovery import Distillation, LoRASpec, attach_lora, frozen_copy


def _reference_kl(student, teacher, labels, temperature=1.0):
    """Sum over (b, t) with labels[b, t+1] != -100 of T² · Σ_v p_t(v) (log p_t(v) - log p_s(v)), a plain loop."""
    total, count = 0.0, 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            if labels[b, t + 1] == -100:
                continue
            log_s = torch.log_softmax(student[b, t].double() / temperature, -1)
            log_t = torch.log_softmax(teacher[b, t].double() / temperature, -1)
            total += float((log_t.exp() * (log_t - log_s)).sum()) * temperature**2
            count += 1
    return total, count


def _logits_and_labels(seed=0, b=3, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g)
    teacher = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_next_token_kl_matches_a_loop(temperature):
    student, teacher, labels = _logits_and_labels()
    total, count = next_token_kl(student, teacher, labels, temperature)
    ref_total, ref_count = _reference_kl(student, teacher, labels, temperature)
    assert int(count) == ref_count == 3 * 6 - 2 - 2  # position t counts when label t+1 is supervised
    assert total.dtype == torch.float32
    assert math.isclose(float(total), ref_total, rel_tol=1e-5)


def test_next_token_kl_is_zero_for_identical_logits_and_ignores_unsupervised_positions():
    student, teacher, labels = _logits_and_labels()
    total, count = next_token_kl(student, student.clone(), labels)
    assert abs(float(total)) < 1e-6 and int(count) == 14
    base, _ = next_token_kl(student, teacher, labels)
    changed = student.clone()
    changed[0, :2, 0] += 100.0  # predicts labels[0, 1:3], all -100
    changed[2, 4:, 1] -= 50.0  # predicts labels[2, 5:] (-100) and the last position, which predicts nothing
    changed[1, -1, 2] += 7.0  # the last position never predicts a token
    torch.testing.assert_close(next_token_kl(changed, teacher, labels)[0], base)
    changed[1, 0, 0] += 1.0  # a supervised position: the sum moves
    assert not torch.allclose(next_token_kl(changed, teacher, labels)[0], base)
    none = torch.full_like(labels, -100)
    total, count = next_token_kl(student, teacher, none)
    assert float(total) == 0 and int(count) == 0


def test_next_token_kl_matches_torch_kl_div_and_differentiates_the_student_only():
    student, teacher, labels = _logits_and_labels(seed=1)
    labels[:] = 0  # everything supervised
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    total, count = next_token_kl(student, teacher, labels)
    p_teacher = torch.softmax(teacher[:, :-1], -1)
    expected = (p_teacher * (p_teacher.log() - torch.log_softmax(student[:, :-1], -1))).sum()
    torch.testing.assert_close(total, expected)
    assert int(count) == 3 * 6
    total.backward()
    assert student.grad is not None and student.grad[:, :-1].abs().sum() > 0
    assert student.grad[:, -1].abs().sum() == 0


@pytest.mark.parametrize(
    ("shapes", "temperature", "match"),
    [
        (((2, 5, 7), (2, 5, 8), (2, 5)), 1.0, r"same shape \[batch, seq_len, vocab\], got \(2, 5, 7\) and \(2, 5, 8\)"),
        (((2, 5, 7), (2, 5, 7), (2, 4)), 1.0, r"labels must be \[batch, seq_len\] = \(2, 5\), got \(2, 4\)"),
        (((2, 5, 7), (2, 5, 7), (2, 5)), 0.0, "`temperature` must be positive, got 0.0"),
    ],
)
def test_next_token_kl_errors(shapes, temperature, match):
    s, t, lab = shapes
    with pytest.raises(ValueError, match=match):
        next_token_kl(torch.zeros(s), torch.zeros(t), torch.zeros(lab, dtype=torch.long), temperature)


def _model(seed=0, layers=2):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=layers))


def test_frozen_copy_is_an_independent_frozen_eval_copy():
    model = _model().train()
    teacher = frozen_copy(model)
    assert model.training and not teacher.training
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, teacher.lm_head.weight)
    with pytest.raises(TypeError, match="merge its LoRA adapters before copying it"):
        frozen_copy(attach_lora(_model(), LoRASpec(r=2)))


def test_distillation_kl_is_the_mean_over_supervised_positions():
    student_model, teacher_model = _model(0), _model(1)
    distill = Distillation(frozen_copy(teacher_model), alpha=0.3, temperature=2.0, device="cpu")
    assert distill.device == torch.device("cpu") and distill.alpha == 0.3
    x = torch.randint(4, 256, (2, 9))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    labels = x.masked_fill(mask == 0, -100)
    student = student_model.eval()(input_ids=x, attention_mask=mask).logits
    with torch.no_grad():
        teacher = teacher_model.eval()(input_ids=x, attention_mask=mask).logits
    ref_total, ref_count = _reference_kl(student.detach(), teacher, labels, 2.0)
    kl = distill.kl(x, mask, student, labels)
    # float32 log-probs (~-5.5) are good to ~1e-6 each, so the small KL (~0.02, times T² = 4) is good to ~1e-6
    # absolutely, not relatively: abs_tol covers that (seen 3.4e-7); a wrong T² or token count is off by far more
    assert math.isclose(float(kl.detach()), ref_total / ref_count, rel_tol=1e-4, abs_tol=1e-5)
    torch.testing.assert_close(distill.teacher_logits(x, mask), teacher)
    assert float(Distillation(frozen_copy(student_model)).kl(x, mask, student, labels).detach()) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -1.0}, "`alpha` must be >= 0, got -1.0"),
        ({"alpha": float("nan")}, "`alpha` must be >= 0, got nan"),
        ({"temperature": 0.0}, "`temperature` must be positive, got 0.0"),
    ],
)
def test_distillation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(_model(), **kwargs)

"""CLIP-AST's PromptSRC self-consistency terms (clipadapt/losses.py) against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipadapt.losses import consistency_kl, consistency_l1


def test_l1_is_the_mean_absolute_difference():
    student = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    assert consistency_l1(student, teacher).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ValueError, match="shapes"):
        consistency_l1(student, teacher[:1])


def test_kl_teacher_to_student_over_b_times_c():
    # Student uniform over C=2: p = (1/2, 1/2). Teacher logits (ln 3, 0): q = (3/4, 1/4). B = 1.
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # Σ q (log q − log p)
    assert consistency_kl(student, teacher).item() == pytest.approx(kl / 2)
    # Two rows, the second identical in both: the sum is unchanged, the divisor doubles (B·C = 4).
    both = consistency_kl(torch.cat([student, teacher]), torch.cat([teacher, teacher]))
    assert both.item() == pytest.approx(kl / 4)


def test_kl_equals_promptsrc_and_has_temperature_squared():
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    promptsrc = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), reduction="sum", log_target=True)
    assert consistency_kl(student, teacher).item() == pytest.approx(promptsrc.item() / 15)
    t = 2.0
    scaled = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="sum", log_target=True)
    assert consistency_kl(student, teacher, temperature=t).item() == pytest.approx(scaled.item() * 4 / 15)


def test_gradients_reach_only_the_student():
    student = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    (consistency_kl(student, teacher) + consistency_l1(student, teacher)).backward()
    assert student.grad is not None and teacher.grad is None
    assert consistency_kl(teacher.detach(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-7)

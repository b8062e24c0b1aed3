"""Dense (RADIO-style) distillation of a dual encoder's image tower (`distill.losses=[dense]`,
graft/distill.py): the loss against its formula and gradcheck, grids resized, an HF teacher's patch
features its model's own, a student taught by two teachers of other image sizes at once."""

import pytest
import torch
import torch.nn.functional as F

from hf_models import make_dual

from graft.distill import dense_loss_sum, to_grid
from graft.models.teachers import HFDualTeacher, ImagesAs
from tests.test_distill import learned, train


def test_dense_is_cosine_distance_plus_smooth_l1_averaged_over_patches():
    s, t = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(2, 9, 5, dtype=torch.float64)
    expected = sum((1 - F.cosine_similarity(s[b, p], t[b, p], dim=0) + F.smooth_l1_loss(s[b, p], t[b, p])).item()
                   for b in range(2) for p in range(9)) / 9
    assert dense_loss_sum(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert dense_loss_sum(t, t).item() == pytest.approx(0.0, abs=1e-12)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: dense_loss_sum(x, t), (s,))


def test_teacher_grids_are_resized_to_the_students():
    flat = torch.full((2, 16, 3), 0.7)
    assert to_grid(flat, 9).shape == (2, 9, 3) and torch.allclose(to_grid(flat, 9), torch.full((2, 9, 3), 0.7))
    x = torch.randn(2, 9, 3)
    assert to_grid(x, 9) is x
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1)  # columns 0..3 on a 4x4 grid
    cols = to_grid(ramp, 4).view(2, 2)
    assert cols[0, 0] < cols[0, 1] and torch.equal(cols[0], cols[1])  # left stays left


def test_an_hf_teachers_patch_features_are_its_vision_models(tmp_path):
    from transformers import CLIPModel

    folder = make_dual("clip", tmp_path / "clip", image_size=32)
    teacher = HFDualTeacher(str(folder), lambda ids: "", ImagesAs((32, [0.5] * 3, [0.5] * 3), (32, [0.5] * 3, [0.5] * 3)))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        own = CLIPModel.from_pretrained(str(folder)).vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(teacher.patch_features(pixels), own[:, 1:])  # class token dropped
    assert teacher.patch_features(pixels).shape == (2, 16, 32)


def test_a_student_learns_from_two_teachers_at_once(tmp_path):
    """RADIO-style: a graft CLIP teacher at 32 px (16 patches, width 32) and an HF CLIP at 32 px
    (16 patches, width 32, CLIP's mean/std), one student at 24 px (9 patches, width 32): each
    teacher gets its own head; the dense loss falls; the heads are the student's, the teachers not."""
    graft_teacher = tmp_path / "graft_teacher"
    assert train(graft_teacher, "vision.image_size=32", embed=16, steps=3) == 0
    hf = make_dual("clip", tmp_path / "hf", image_size=32)
    weights = learned(tmp_path / "student", f"{graft_teacher},{hf}", losses=["distill_dense"])
    assert {k for k in weights if k.startswith("dense_heads")} == {
        f"dense_heads.{i}.{layer}.{p}" for i in (0, 1) for layer in (0, 2) for p in ("weight", "bias")}
    assert not any(k.startswith(("teacher", "model.")) for k in weights)
    assert weights["dense_heads.1.2.weight"].shape == (32, 32)

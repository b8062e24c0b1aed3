"""Dense (RADIO-style) distillation of a dual encoder's image tower (`distill.losses=[dense]`,
graft/distill.py): the loss against its formula and gradcheck, grids resized, an HF teacher's patch
features its model's own, a student taught by two teachers of other image sizes at once; and masked
feature modelling (`distill.losses=[masked]`, BEiT v2 / EVA): its loss, mask and a student run."""

import pytest
import torch
import torch.nn.functional as F

from hf_models import make_dino, make_dual

from graft.distill import dense_loss_sum, masked_loss_sum, to_grid
from graft.models.mim import patch_mask
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


# ---- masked feature modelling with a teacher's features as targets (BEiT v2, EVA) -----------------


def test_masked_is_the_patch_distance_summed_over_masked_patches_only():
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 9, 4, dtype=torch.float64)
    masked = torch.zeros(2, 9, dtype=torch.bool)
    masked[0, [0, 3]], masked[1, [2, 7, 8]] = True, True
    targets = t[masked]  # row-major: image 0's patches 0, 3, then image 1's 2, 7, 8
    expected = sum((1 - F.cosine_similarity(s[i], targets[i], dim=0) + F.smooth_l1_loss(s[i], targets[i])).item()
                   for i in range(5))
    assert masked_loss_sum(s, t, masked).item() == pytest.approx(expected, rel=1e-12)
    t2 = t.clone()
    t2[~masked] = 100.0  # an unmasked patch's target changes nothing
    assert masked_loss_sum(s, t2, masked).item() == pytest.approx(expected, rel=1e-12)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: masked_loss_sum(x, t, masked), (s,))


def test_the_mask_is_a_function_of_the_batch_with_one_patch_at_least():
    pixels = torch.rand(64, 3, 24, 24)
    a, b = patch_mask(pixels, 3, 0.4), patch_mask(pixels.clone(), 3, 0.4)
    assert torch.equal(a, b) and a.shape == (64, 9) and bool(a.any(1).all())
    assert 0.3 < a.float().mean().item() < 0.55  # about 40 % (plus the one forced per image)
    assert not torch.equal(a, patch_mask(torch.rand(64, 3, 24, 24), 3, 0.4))


def test_a_masked_student_learns_the_teachers_features(tmp_path, capsys):
    """The student reads a masked image a second time and predicts the teacher's features of the
    masked patches through its head: the loss falls (`learned`), the head and mask vector are the
    student's, and distill.mask_prob changes what is masked (the count the loss is over)."""
    teacher = tmp_path / "teacher"
    assert train(teacher, "vision.image_size=32", embed=16, steps=3) == 0
    weights = learned(tmp_path / "student", str(teacher), losses=["distill_masked"])
    assert {k for k in weights if k.startswith(("masked_heads", "masker"))} == {
        "masker.mask_embedding", *(f"masked_heads.0.{layer}.{p}" for layer in (0, 2) for p in ("weight", "bias"))}
    from graft.designs import design
    from graft.recipes import recipe

    counts = []
    for prob in (0.4, 0.8):
        cfg = recipe("clip", [f"distill.teachers=[{teacher}]", "distill.losses=[masked]", f"distill.mask_prob={prob}"])
        objective = design(cfg.model).objectives(cfg, None)["distill_masked"]
        counts.append(objective.count({"pixel_values": torch.rand(32, 3, 24, 24, generator=torch.Generator().manual_seed(0))}))
    assert counts[0] < counts[1] <= 32 * 9
    assert train(tmp_path / "bad", f"distill.teachers=[{teacher}]", "distill.mask_prob=0.5") == 2
    assert "distill.mask_prob=0.5 is read by the masked loss only" in capsys.readouterr().err


def test_an_hf_vision_tower_alone_teaches_the_patch_losses(tmp_path, capsys):
    """A CLIP vision tower saved alone (no text tower, no shared space: DINO-style teachers are towers)
    teaches `dense`: its features are the tower's own last hidden state without the class token, the
    student's loss falls; asked for an embedding loss it is refused in one line."""
    from transformers import CLIPVisionModel

    from graft.models.teachers import HFVisionTeacher
    from hf_models import CLIP_MEAN, CLIP_STD, make_vision

    tower = make_vision("clip", tmp_path / "tower")  # 24 px, 8 px patches, CLIP's mean and std
    teacher = HFVisionTeacher(str(tower), ImagesAs((24, CLIP_MEAN, CLIP_STD), (24, [0.5] * 3, [0.5] * 3)))
    pixels = torch.rand(2, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        theirs = (pixels * 0.5 + 0.5 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        own = CLIPVisionModel.from_pretrained(str(tower))(pixel_values=theirs).last_hidden_state
        torch.testing.assert_close(teacher.patch_features(pixels), own[:, 1:])
    weights = learned(tmp_path / "student", str(tower), losses=["distill_dense"])
    assert weights["dense_heads.0.2.weight"].shape == (32, 32)
    capsys.readouterr()
    assert train(tmp_path / "bad", f"distill.teachers=[{tower}]", "distill.losses=[dense,fd]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an HF vision tower alone" in err[0] and "not fd" in err[0], err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("registers", [0, 4])
def test_a_dinov2_teachers_patch_features_are_its_models_after_its_processor(tmp_path, registers):
    """A DINOv2 folder (`registers` register tokens: Dinov2WithRegisters) reads the student's pixels
    as its image processor would (its crop size, ImageNet's mean and std): at the student's size its
    patch features are, to the bit, the model's last hidden state after the class token and the
    registers; at another crop (32 px, the student 24 px) they follow the processor's own pipeline
    on the same picture: PIL's bicubic against torch's leaves cosine 0.99996 at the worst patch
    (AMD EPYC), the bar 0.999; 0.969 with the student's mean and std instead of ImageNet's."""
    from transformers import AutoImageProcessor, AutoModel

    from graft.build import processor_for
    from graft.data.world_source import make_world
    from graft.designs.dual_teachers import _load
    from graft.models.teachers import HFVisionTeacher, IMAGENET_MEAN, IMAGENET_STD
    from graft.recipes import RECIPES

    same = make_dino(tmp_path / "same", registers, crop=24)
    teacher = HFVisionTeacher(str(same), ImagesAs((24, IMAGENET_MEAN, IMAGENET_STD), (24, [0.5] * 3, [0.5] * 3)))
    pixels = torch.rand(2, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        theirs = (pixels * 0.5 + 0.5 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        own = AutoModel.from_pretrained(str(same))(pixel_values=theirs).last_hidden_state
        assert own.shape[1] == 1 + registers + 9
        torch.testing.assert_close(teacher.patch_features(pixels), own[:, 1 + registers:], rtol=0, atol=0)

    other = make_dino(tmp_path / "other", registers, crop=32)
    cfg = RECIPES["clip"]()
    cfg.vision.image_size = 24
    image = make_world(cfg).sample("test", 0).image  # a 24 px scene
    loaded = _load(str(other), cfg, None)  # as `distill.teachers` loads it
    with torch.no_grad():
        mine = loaded.patch_features(processor_for(cfg).pixels(image)[None])
        hf = AutoImageProcessor.from_pretrained(str(other))(image, return_tensors="pt")["pixel_values"]
        ref = AutoModel.from_pretrained(str(other))(pixel_values=hf).last_hidden_state[:, 1 + registers:]
    assert mine.shape == ref.shape == (1, 16, 32)
    assert F.cosine_similarity(mine, ref, dim=-1).min() >= 0.999


def test_a_dinov2_with_registers_teaches_dense_and_masked(tmp_path, capsys):
    """A DINOv2 teacher with registers at 32 px (16 patches) teaches a 24 px student (9 patches):
    both patch losses fall, the head maps to its width; asked for an embedding loss it is refused."""
    dino = make_dino(tmp_path / "dino", registers=4, crop=32)
    weights = learned(tmp_path / "student", str(dino), losses=["distill_dense", "distill_masked"])
    assert weights["dense_heads.0.2.weight"].shape == (32, 32)
    capsys.readouterr()
    assert train(tmp_path / "bad", f"distill.teachers=[{dino}]", "distill.losses=[dense,crd]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an HF vision tower alone" in err[0] and "not crd" in err[0], err
    assert not (tmp_path / "bad").exists()

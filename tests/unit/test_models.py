"""Model builders and freezing: the study notes' three bugs must not come back."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from visionpipe.models import (
    ModelSpec,
    build_googlenet,
    build_model,
    build_backbone,
    param_groups,
    set_trainable,
    strip_aux_heads,
    train_mode,
)


def test_head_only_phase_changes_no_backbone_parameter_or_running_statistic() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", 4)
    set_trainable(model, ["fc"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(3):
        train_mode(model)
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 4, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("fc.") for k in changed), changed
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_set_trainable_really_freezes_and_rejects_unknown_modules() -> None:
    model = build_backbone("resnet18", 3)
    names = set_trainable(model, ["fc"])
    assert names == ["fc.weight", "fc.bias"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))
    assert all(p.requires_grad for p in model.parameters()) is False
    set_trainable(model, ["*"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no parameter matches"):
        set_trainable(model, ["classifier"])


def test_new_head_is_a_plain_linear_so_logits_can_be_negative() -> None:
    model = build_backbone("resnet50", 7).eval()
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 7)
    assert (logits < 0).any(), "logits clipped at zero: is there an activation after the head?"


def test_a_short_last_batch_runs_through_both_architectures() -> None:
    for model in (build_backbone("resnet18", 5), strip_aux_heads(build_googlenet(5, True))):
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
            assert model(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_param_groups_give_the_backbone_a_fraction_of_the_head_rate() -> None:
    model = build_backbone("resnet18", 3)
    set_trainable(model, ["*"])
    groups = param_groups(model, lr=0.1, backbone_lr_fraction=0.25)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 0.1 and by_name["backbone"]["lr"] == pytest.approx(0.025)
    assert len(by_name["head"]["params"]) == 2  # type: ignore[arg-type]


def test_the_backbone_state_takes_imagenet_weights_but_keeps_the_new_head() -> None:
    from visionpipe.models import backbone_state

    source = torchvision.models.resnet18(weights=None).state_dict()  # 1000-way fc
    model = build_backbone("resnet18", 3)
    head = model.fc.weight.clone()
    assert not [k for k in backbone_state(model, source) if k.startswith("fc.")]
    model.load_state_dict(backbone_state(model, source), strict=False)
    assert torch.equal(model.conv1.weight, source["conv1.weight"])
    assert torch.equal(model.fc.weight, head) and model.fc.out_features == 3


def test_googlenet_state_dict_loads_into_torchvision_googlenet_with_the_standard_stem() -> None:
    trained = strip_aux_heads(build_googlenet(10, small_input_stem=False))
    reference = torchvision.models.googlenet(weights=None, aux_logits=False, num_classes=10,
                                             init_weights=False)
    reference.load_state_dict(trained.state_dict())  # strict: same keys and shapes
    # The small stem only drops a weightless max-pool: the keys stay the same.
    small = strip_aux_heads(build_googlenet(10, small_input_stem=True))
    assert small.state_dict().keys() == reference.state_dict().keys()


def test_googlenet_has_auxiliary_outputs_only_in_training() -> None:
    model = build_googlenet(4, small_input_stem=True)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.aux_logits1 is not None and out.aux_logits2 is not None
    model.eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(2, 3, 32, 32)), torch.Tensor)
    exported = build_model(ModelSpec(arch="googlenet", num_classes=4, class_names=list("abcd"),
                                     image_size=32, small_input_stem=True))
    assert exported.aux1 is None and exported.aux2 is None


@pytest.mark.parametrize(("arch", "head"), [
    ("resnet18", "fc"), ("efficientnet_b0", "classifier.1"), ("convnext_tiny", "classifier.2"),
    ("vit_b_16", "heads.head")])
def test_any_torchvision_backbone_gets_a_new_head_where_it_keeps_its_classifier(
        arch: str, head: str) -> None:
    from visionpipe.models import HEAD, backbone_frozen, backbone_state, head_modules
    from visionpipe.weights import check_state_dict_keys

    torch.manual_seed(0)
    model = build_backbone(arch, 3, image_size=32)
    assert head_modules(model) == (head,)
    new_head = model.get_submodule(head)
    assert isinstance(new_head, nn.Linear) and new_head.out_features == 3
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # ImageNet's weights (a ViT's at 224 px, its position embedding interpolated to 32 px).
    imagenet = torchvision.models.get_model(arch).state_dict()
    backbone = backbone_state(model, imagenet)
    check_state_dict_keys(model, backbone, ignore_prefixes=[f"{head}."])
    model.load_state_dict(backbone, strict=False)
    some = next(k for k in backbone if not k.startswith(head) and backbone[k].dim() > 1
                and "pos_embedding" not in k)
    torch.testing.assert_close(model.state_dict()[some], imagenet[some])
    names = set_trainable(model, [HEAD])
    assert names == [f"{head}.weight", f"{head}.bias"] and backbone_frozen(model)
    assert build_model(ModelSpec(arch=arch, num_classes=3, class_names=list("abc"),
                                 image_size=32)).get_submodule(head).out_features == 3


def test_a_random_init_starts_every_residual_branch_at_zero() -> None:
    from visionpipe.models import build_backbone

    model = build_backbone("resnet50", 3, zero_init_residual=True)
    last_norms = [block.bn3.weight for layer in (model.layer1, model.layer4) for block in layer]
    assert all(float(w.abs().sum()) == 0 for w in last_norms)
    assert float(build_backbone("resnet50", 3).layer1[0].bn3.weight.abs().sum()) > 0

"""Differentiable 3D Grad-CAM against MONAI's GradCAM, the shortcut against autograd, and its side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet, resnet18
from monai.visualize import GradCAM
from torch import nn

from due_ext.explain.cam import combine_cam, minmax_normalize, normalized_cam
from due_ext.explain.gradcam import find_gap_linear_head, grad_cam, gradcam_features

SIZE = (24, 24, 16)


def small_resnet(seed: int = 0) -> ResNet:
    """A narrow 3D ResNet (MONAI's class, widths 4-16) whose layer4 keeps a 3x3x2 map at 24x24x16."""
    torch.manual_seed(seed)
    model = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 16], spatial_dims=3,
                   n_input_channels=1, num_classes=2, no_max_pool=True, shortcut_type="B", bias_downsample=False)
    _randomise_head(model)
    return model


def _randomise_head(model: nn.Module) -> None:
    # MONAI zeroes the fc bias; random values make the two classes' maps differ clearly.
    with torch.no_grad():
        model.fc.bias.normal_()
        model.fc.weight.normal_()


class FlattenHead(nn.Module):
    """Conv features followed by flatten + MLP: no global average pooling, so Grad-CAM needs autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv3d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 6 * 6 * 4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


def identity_minmax(cam: torch.Tensor) -> torch.Tensor:
    """MONAI postprocessing replaced by our min-max (its default inverts the map)."""
    return minmax_normalize(cam)


def align_corners_upsampler(size):
    return lambda cam: F.interpolate(cam, size=size, mode="trilinear", align_corners=True)


def monai_gradcam(model: nn.Module, x: torch.Tensor, class_idx, layer: str = "layer4") -> torch.Tensor:
    # MONAI registers hooks it never removes and zeroes gradients: give it a copy.
    cam = GradCAM(copy.deepcopy(model), target_layers=layer, upsampler=align_corners_upsampler,
                  postprocessing=identity_minmax)
    return cam(x, class_idx=class_idx)


@pytest.fixture
def volume() -> torch.Tensor:
    return torch.randn(2, 1, *SIZE, generator=torch.Generator().manual_seed(1))


def test_equals_monai_gradcam_resnet18(volume):
    torch.manual_seed(0)
    model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, no_max_pool=True).eval()
    _randomise_head(model)
    x = volume[:1, :, ::2, ::2, ::2].contiguous()  # 12x12x8: layer4 keeps a 2x2x1 map at full width
    ours = grad_cam(model, x)
    reference = monai_gradcam(model, x, class_idx=None)
    assert ours.shape == (1, 1, 12, 12, 8)
    ours = ours.detach()
    assert float(ours.max()) == pytest.approx(1.0, abs=1e-5) and float(ours.std()) > 0.05  # a real, varied map
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("class_idx", [0, 1])
def test_equals_monai_gradcam_batch_and_class(volume, class_idx):
    model = small_resnet().eval()
    ours = grad_cam(model, volume, class_index=torch.full((2,), class_idx))
    reference = monai_gradcam(model, volume, class_idx=class_idx)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_shortcut_alpha_equals_autograd_alpha(volume):
    model = small_resnet().eval()
    labels = torch.tensor([1, 0])
    assert find_gap_linear_head(model, "layer4") == (model.avgpool, model.fc)
    short = gradcam_features(model, volume, class_index=labels)
    auto = gradcam_features(model, volume, class_index=labels, force_autograd=True)
    d, h, w = short.features.shape[2:]
    assert (d, h, w) == (3, 3, 2)
    torch.testing.assert_close(short.alpha, model.fc.weight.detach()[labels] / (d * h * w))
    torch.testing.assert_close(short.alpha, auto.alpha, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(short.logits, auto.logits)
    assert not short.alpha.requires_grad and not auto.alpha.requires_grad
    torch.testing.assert_close(short.class_index, labels)


def test_create_graph_alpha_depends_on_fc_weight(volume):
    model = small_resnet().eval()
    short = gradcam_features(model, volume, class_index=torch.tensor([0, 1]), create_graph=True)
    auto = gradcam_features(model, volume, class_index=torch.tensor([0, 1]), create_graph=True, force_autograd=True)
    for found in (short, auto):
        assert found.alpha.requires_grad
        (grad_w,) = torch.autograd.grad(found.alpha.sum(), model.fc.weight, retain_graph=True)
        expected = torch.zeros_like(model.fc.weight)
        expected[[0, 1]] = 1.0 / found.features[0, 0].numel()
        torch.testing.assert_close(grad_w, expected)


def test_predicted_class_is_default(volume):
    model = small_resnet().eval()
    found = gradcam_features(model, volume)
    torch.testing.assert_close(found.class_index, found.logits.argmax(1))


def test_batch_equals_per_sample(volume):
    model = small_resnet().eval()
    labels = torch.tensor([0, 1])
    batch = grad_cam(model, volume, class_index=labels)
    single = torch.cat([grad_cam(model, volume[i:i + 1], class_index=labels[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("force_autograd", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_mode_and_grads_untouched(volume, train, force_autograd):
    model = small_resnet().train(train)
    params = list(model.parameters())
    for i, p in enumerate(params):  # half the parameters carry a gradient already, half have none
        p.grad = torch.full_like(p, 0.5) if i % 2 == 0 else None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    modes = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]

    grad_cam(model, volume, class_index=torch.tensor([1, 1]), force_autograd=force_autograd)

    assert [m.training for m in model.modules()] == modes
    assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()] == hooks
    for p, old in zip(params, before, strict=True):
        if old is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, old)


def test_loss_on_cam_reaches_backbone_through_features(volume):
    model = small_resnet().eval()
    target = torch.zeros(2, 1, *SIZE)
    target[..., 8:16, 8:16, 4:12] = 1
    cam = grad_cam(model, volume, class_index=torch.tensor([1, 1]))
    loss = (cam - target).abs().mean()
    grads = torch.autograd.grad(loss, [model.conv1.weight, model.layer2[0].conv1.weight, model.fc.weight],
                                allow_unused=True)
    assert grads[0] is not None and float(grads[0].abs().sum()) > 0
    assert grads[1] is not None and float(grads[1].abs().sum()) > 0
    # alpha is a constant by default: the head's weights receive nothing through the map
    assert grads[2] is None or float(grads[2].abs().sum()) == 0


def test_non_gap_head_uses_autograd_and_matches_monai():
    torch.manual_seed(3)
    model = FlattenHead().eval()
    x = torch.randn(2, 1, 24, 24, 16)
    assert find_gap_linear_head(model, "features") is None
    found = gradcam_features(model, x, class_index=torch.tensor([2, 0]), target_layer="features")
    assert found.features.shape == (2, 6, 6, 6, 4)
    # alpha against an explicit per-sample gradient
    for i, k in enumerate([2, 0]):
        a = model.features(model.stem(x[i:i + 1])).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model.head(a)[0, k], a)
        torch.testing.assert_close(found.alpha[i], g.mean(dim=(2, 3, 4))[0], atol=1e-7, rtol=1e-5)
    for k in (0, 2):
        ours = grad_cam(model, x, class_index=torch.full((2,), k), target_layer="features")
        torch.testing.assert_close(ours, monai_gradcam(model, x, k, layer="features"), atol=1e-5, rtol=0)


def test_dotted_target_layer(volume):
    model = small_resnet().eval()
    found = gradcam_features(model, volume, class_index=torch.tensor([0, 1]), target_layer="layer4.0.conv2")
    assert found.features.shape[:2] == (2, 16)
    reference = monai_gradcam(model, volume, 1, layer="layer4.0.conv2")
    ours = grad_cam(model, volume, class_index=torch.tensor([1, 1]), target_layer="layer4.0.conv2")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_shortcut_falls_back_when_head_is_not_used_as_declared(volume):
    class Rewired(ResNet):
        def forward(self, x):  # declared layer4 -> avgpool -> fc, but scales before pooling
            x = self.layer4(self.layer3(self.layer2(self.layer1(self.act(self.bn1(self.conv1(x)))))))
            return self.fc(self.avgpool(2 * x).flatten(1))

    torch.manual_seed(0)
    model = Rewired(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 16], spatial_dims=3,
                    n_input_channels=1, num_classes=2, no_max_pool=True).eval()
    _randomise_head(model)
    assert find_gap_linear_head(model, "layer4") is not None  # the declaration looks like the shortcut ...
    found = gradcam_features(model, volume, class_index=torch.tensor([0, 1]))
    d, h, w = found.features.shape[2:]
    # ... but the hooks see the pool consume 2*A, so alpha comes from autograd: twice the naive shortcut
    torch.testing.assert_close(found.alpha, 2 * model.fc.weight.detach()[[0, 1]] / (d * h * w))


def test_hooks_removed_on_error(volume):
    model = small_resnet().eval()
    with pytest.raises(RuntimeError):
        gradcam_features(model, volume.repeat(1, 2, 1, 1, 1))  # two channels for a one-channel stem: forward raises
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bad_arguments(volume):
    model = small_resnet().eval()
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        gradcam_features(model, volume, target_layer="layer9")
    with pytest.raises(ValueError, match=r"class_index values must lie in \[0, 2\)"):
        gradcam_features(model, volume, class_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        gradcam_features(model, volume, class_index=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="must output one"):
        gradcam_features(model, volume, target_layer="fc")
    with torch.no_grad(), pytest.raises(RuntimeError, match="carries no graph"):
        gradcam_features(model, volume, force_autograd=True)


def test_no_grad_shortcut_works(volume):
    model = small_resnet().eval()
    with torch.no_grad():
        cam = grad_cam(model, volume, class_index=torch.tensor([1, 1]))
    expected = grad_cam(model, volume, class_index=torch.tensor([1, 1])).detach()
    torch.testing.assert_close(cam, expected)
    found = gradcam_features(model, volume, class_index=torch.tensor([1, 1]))
    torch.testing.assert_close(cam[:, 0], minmax_normalize(F.interpolate(
        combine_cam(found.features, found.alpha).unsqueeze(1), size=SIZE, mode="trilinear",
        align_corners=True)[:, 0]).detach())


def test_minmax_normalize_flat_rule_and_nan():
    """Flat samples (range <= FLAT_RTOL x scale) become zeros without gradient; others the usual min-max; a
    NaN stays in its own sample."""
    from due_ext.explain.cam import FLAT_RTOL, MINMAX_EPS

    volume = torch.tensor([[4.0, 4.0 + 3.9e-3, 4.0, 4.001],  # range 3.9e-3 <= 1e-3 * 4.0039: flat
                           [4.0, 4.0 + 4.1e-3, 4.0, 4.001],  # range 4.1e-3 > 1e-3 * 4.0041
                           [0.0, 0.0, 0.0, 0.0],             # all zero: flat
                           [1.0, float("nan"), 0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    assert FLAT_RTOL == 1e-3
    out = minmax_normalize(volume)
    assert (out[0] == 0).all() and (out[2] == 0).all() and torch.isnan(out[3]).all()
    expected = (volume[1] - 4.0) / (4.1e-3 + MINMAX_EPS)
    torch.testing.assert_close(out[1], expected.detach(), rtol=1e-12, atol=1e-12)
    (out[:3] * torch.arange(1.0, 5.0, dtype=torch.float64)).sum().backward()
    assert (volume.grad[0] == 0).all() and (volume.grad[2] == 0).all() and volume.grad[1].abs().max() > 100
    # the scale decides: the same ranges against a larger scale are flat
    assert (minmax_normalize(volume.detach()[:2], scale=torch.full((2,), 5.0, dtype=torch.float64)) == 0).all()


def test_normalized_cam_scale_is_the_map_before_its_relu():
    """A map relu-ed away but for a faint spot (1e-4 of max |P|) is flat; the same spot on a zero background
    (P itself tiny everywhere) is an ordinary map."""
    features = torch.zeros(2, 1, 2, 2, 2, dtype=torch.float64)
    features[0] = -1.0
    features[:, 0, 1, 1, 1] = 1e-4
    cam = normalized_cam(features, torch.ones(2, 1, dtype=torch.float64), (3, 3, 3))
    assert (cam[0] == 0).all()
    assert cam[1].max() > 0.99 and cam[1, 2, 2, 2] == cam[1].max()

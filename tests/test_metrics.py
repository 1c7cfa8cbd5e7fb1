"blda.metrics against torchmetrics, and the std definition against the paper's table."
import math
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from blda.classes import SYNTHIA_13, SYNTHIA_16
from blda.metrics import class_bias, confusion_matrix, mean_std, per_class_iou, scores

# DAFormer's published per-class IoUs on GTA→Cityscapes (the DAFormer paper's per-class table): mIoU 68.3, std 16.8.
DAFORMER = [95.7, 70.2, 89.4, 53.5, 48.1, 49.6, 55.8, 59.4, 89.9, 47.9, 92.5, 72.2, 44.7, 92.3, 74.5, 78.2, 65.1, 55.9, 61.8]
HRDA = [96.4, 74.4, 91.0, 61.6, 51.5, 57.1, 63.9, 69.3, 91.3, 48.4, 94.2, 79.0, 52.9, 93.9, 84.1, 85.7, 75.9, 63.9, 67.5]


def test_std_matches_the_paper():
    m, s = mean_std(torch.tensor(DAFORMER, dtype=torch.float64))
    assert abs(m - 68.3) < 0.06 and round(s, 1) == 16.8   # the transcribed per-class values average 68.25
    m, s = mean_std(torch.tensor(HRDA, dtype=torch.float64))
    assert round(m, 1) == 73.8 and abs(s - 15.4) < 0.06          # population std 15.35, the BLDA table's 15.4


def test_against_torchmetrics_streaming():
    g = torch.Generator().manual_seed(0)
    C = 19
    jac = MulticlassJaccardIndex(C, average=None, ignore_index=255)
    acc = MulticlassAccuracy(C, average=None, ignore_index=255)
    cm = torch.zeros(C, C, dtype=torch.long)
    for _ in range(4):   # streaming over batches
        target = torch.randint(0, C, (2, 32, 48), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.1] = 255
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=C - 1), torch.randint(0, C, target.shape, generator=g))
        cm += confusion_matrix(pred, target, C)
        jac.update(pred, target); acc.update(pred, target)
    s = scores(cm)
    assert torch.allclose(per_class_iou(cm).float(), jac.compute(), atol=1e-6)
    assert math.isclose(s['mIoU'], jac.compute().mean().item() * 100, abs_tol=1e-4)
    assert math.isclose(s['mAcc'], acc.compute().mean().item() * 100, abs_tol=1e-4)


def test_synthia_subsets():
    cm = torch.diag(torch.arange(1, 20)) + 1
    iou = per_class_iou(cm) * 100
    s16, s13 = scores(cm, SYNTHIA_16), scores(cm, SYNTHIA_13)
    assert len(s16['IoU']) == 16 and 'terrain' not in s16['IoU'] and 'wall' not in s13['IoU']
    assert math.isclose(s16['mIoU'], iou[list(SYNTHIA_16)].mean().item(), rel_tol=1e-12)
    assert math.isclose(s13['mIoU'], iou[list(SYNTHIA_13)].mean().item(), rel_tol=1e-12)


def test_bias_definition():
    g = torch.Generator().manual_seed(1)
    cm = torch.randint(0, 100, (5, 5), generator=g)
    direct = torch.stack([sum(cm[c, l] / cm[c].sum() for c in range(5)) / 5 - 1 / 5 for l in range(5)]).double()
    assert torch.allclose(class_bias(cm), direct)
    assert abs(class_bias(cm).sum().item()) < 1e-12
    # an absent class is skipped in the mean, and the biases still sum to zero
    cm[2] = 0
    assert abs(class_bias(cm).sum().item()) < 1e-12


def test_shape_mismatch_is_an_error():
    import pytest
    with pytest.raises(ValueError, match='shape'):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 4)

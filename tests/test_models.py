"blda.models: shapes of the C and T toys, the dlv2red head, the cumulative-density head, local weights, optimiser groups."
import math
import pytest
import torch
import torch.nn.functional as F
from blda.models import DAFormerHead, DLV2Head, EncoderWeightsError, SegOutput, build_model, param_groups


@pytest.fixture(scope='module')
def t_model():
    torch.manual_seed(0)
    return build_model('T', num_classes=5, encoder='mit_b0', cdf_head=True).eval()


@pytest.fixture(scope='module')
def c_model():
    torch.manual_seed(0)
    return build_model('C', num_classes=5, encoder='resnet18', cdf_head=True).eval()


def test_t_shapes(t_model):
    with torch.no_grad(): out = t_model(torch.randn(2, 3, 64, 96))
    assert isinstance(out, SegOutput) and t_model.output_stride == 4 and t_model.arch == 'T'
    assert out.logits.shape == (2, 5, 16, 24) and out.cdf.shape == (2, 1, 16, 24)
    assert [tuple(f.shape) for f in out.features] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]


def test_c_shapes(c_model):
    with torch.no_grad(): out = c_model(torch.randn(2, 3, 64, 96))
    assert c_model.output_stride == 8 and c_model.arch == 'C'
    assert out.logits.shape == (2, 5, 8, 12) and out.cdf.shape == (2, 1, 8, 12)
    assert [f.shape[-2:] for f in out.features] == [(16, 24), (8, 12), (8, 12), (8, 12)]   # dilated, stride 8
    assert out.features[-1].shape[1] == 512


def test_no_cdf_head_by_default():
    model = build_model('t', num_classes=3, encoder='mit_b0').eval()
    assert model(torch.randn(1, 3, 32, 32)).cdf is None and model.head.conv_cdf is None


def test_dlv2red_is_a_sum_of_two_dilated_convolutions(c_model):
    with torch.no_grad():
        out = c_model(torch.randn(1, 3, 64, 64))
        x, (a, b) = out.features[-1], c_model.head.branches
        direct = (F.conv2d(x, a.weight, a.bias, padding=6, dilation=6)
                  + F.conv2d(x, b.weight, b.bias, padding=12, dilation=12))
    assert (a.dilation, b.dilation) == ((6, 6), (12, 12)) and len(c_model.head.branches) == 2
    assert torch.allclose(out.logits, direct, atol=1e-5)
    assert torch.allclose(out.cdf, c_model.head.conv_cdf(x), atol=1e-6)   # C's cdf head reads the last stage


def test_full_aspp_option():
    head = DLV2Head(16, 4, dilations=(6, 12, 18, 24))
    assert [br.dilation[0] for br in head.branches] == [6, 12, 18, 24]


def test_daformer_head_structure_and_cdf_before_dropout():
    torch.manual_seed(0)
    head = DAFormerHead([8, 16, 24, 32], num_classes=3, embed_dim=16, cdf_head=True)
    dw = [br for br in head.fuse.branches]
    assert dw[0][0].kernel_size == (1, 1)                                       # dilation 1: a 1×1 branch
    assert [br[0][0].dilation[0] for br in dw[1:]] == [6, 12, 18]              # depthwise, dilated
    assert all(br[0][0].groups == 4 * 16 for br in dw[1:])
    assert head.fuse.bottleneck[0].kernel_size == (3, 3) and head.dropout.p == 0.1
    feats = [torch.randn(2, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate([8, 16, 24, 32])]
    head.train()
    first, second = head(feats), head(feats)
    assert first.logits.shape == (2, 3, 16, 16) and first.cdf.shape == (2, 1, 16, 16)
    assert not torch.allclose(first.logits, second.logits)   # dropout acts on the classifier input …
    assert torch.allclose(first.cdf, second.cdf)               # … but not on the cdf head's


def test_daformer_head_size():
    "The MiT-B5 DAFormer head: embeddings 263,168 + 1×1 branch 262,656 + 3 separable branches 821,760 + bottleneck 2,359,808 + classifier 4,883."
    head = DAFormerHead([64, 128, 320, 512], num_classes=19)
    assert sum(p.numel() for p in head.parameters()) == 3_712_275


def test_timm_encoder_dilates():
    model = build_model('C', num_classes=3, encoder='tu-resnet18d').eval()
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 3, 8, 8)


def test_local_weights_round_trip(tmp_path, c_model):
    path = tmp_path / 'r18.pth'
    torch.save(c_model.encoder.state_dict(), path)
    loaded = build_model('C', num_classes=5, encoder='resnet18', encoder_weights=path)
    for (n, a), (_, b) in zip(c_model.encoder.state_dict().items(), loaded.encoder.state_dict().items()):
        assert torch.equal(a, b), n
    # wrapped, prefixed, with an ImageNet classifier: still loads
    wrapped = {'state_dict': {'backbone.' + k: v for k, v in c_model.encoder.state_dict().items()}}
    wrapped['state_dict']['backbone.fc.weight'] = torch.zeros(10, 512)
    torch.save(wrapped, tmp_path / 'wrapped.pth')
    loaded = build_model('C', num_classes=5, encoder='resnet18', encoder_weights=str(tmp_path / 'wrapped.pth'))
    assert torch.equal(loaded.encoder.conv1.weight, c_model.encoder.conv1.weight)


def test_weight_errors(tmp_path, c_model):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        build_model('C', encoder='resnet18', encoder_weights=tmp_path / 'missing.pth')
    with pytest.raises(FileNotFoundError, match='encoder_weights'):
        build_model('C', encoder='resnet18', encoder_weights='pretrained/nothing.pth')
    with pytest.raises(ValueError, match='never downloaded'):
        build_model('C', encoder='resnet18', encoder_weights='imagenet')
    path = tmp_path / 'r18.pth'
    torch.save(c_model.encoder.state_dict(), path)
    with pytest.raises(EncoderWeightsError, match='r18.pth.*do not fit'):
        build_model('C', encoder='resnet34', encoder_weights=path)
    whole = path.read_bytes()
    (tmp_path/'cut.pth').write_bytes(whole[:len(whole) // 2])
    torch.save(torch.zeros(3), tmp_path/'tensor.pth')
    torch.save({'encoder': c_model.encoder}, tmp_path/'module.pth')         # a pickled module: weights_only refuses it
    for name, words in (('cut.pth', 'cannot be read as tensors'), ('tensor.pth', 'holds a Tensor, not a state dict'),
                        ('module.pth', 'cannot be read as tensors')):
        with pytest.raises(EncoderWeightsError, match=f'encoder_weights .*{name} {words}'):
            build_model('C', encoder='resnet18', encoder_weights=tmp_path/name)


def test_bad_names():
    with pytest.raises(ValueError, match='arch'): build_model('X')
    with pytest.raises(ValueError, match="encoder 'resnet7'"): build_model('C', encoder='resnet7')
    with pytest.raises(ValueError, match="encoder 'vgg11'"): build_model('C', encoder='vgg11')   # cannot be dilated


def _check_groups(model, lr=6e-5, wd=0.01):
    groups = param_groups(model, lr, wd)
    names = [n for g in groups for n in g['names']]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(names) == len(set(names))
    assert sum(len(g['params']) for g in groups) == len(names)
    torch.optim.AdamW(groups)
    return {n: g for g in groups for n in g['names']}


def test_param_groups_t(t_model):
    by_name = _check_groups(t_model)
    for name, g in by_name.items():
        if name.startswith('head.'):
            assert math.isclose(g['lr'], 6e-4) and g['weight_decay'] == 0.01, name   # 'head' wins over nothing else
        elif 'norm' in name:
            assert g['lr'] == 6e-5 and g['weight_decay'] == 0, name
        else:
            assert g['lr'] == 6e-5 and g['weight_decay'] == 0.01, name
    assert any('norm' in n for n in by_name)


def test_param_groups_c(c_model):
    by_name = _check_groups(c_model)
    assert math.isclose(by_name['head.branches.0.weight']['lr'], 6e-4)
    assert by_name['encoder.bn1.weight']['weight_decay'] == 0.01   # torchvision BN is 'bn*', no 'norm': decayed, as mmseg's


def test_param_groups_first_match_longest_key():
    model = torch.nn.Module()
    model.head_norm = torch.nn.LayerNorm(2)
    model.pos_block_head = torch.nn.Linear(2, 2)
    model.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    by_name = {n: g for g in param_groups(model, 1.0, 1.0) for n in g['names']}
    assert by_name['head_norm.weight']['lr'] == 10 and by_name['head_norm.weight']['weight_decay'] == 1   # 'head' before 'norm'
    assert by_name['pos_block_head.weight']['lr'] == 1 and by_name['pos_block_head.weight']['weight_decay'] == 0
    assert 'frozen.weight' not in by_name


def _random_state(encoder):
    "Random tensors in `encoder`'s names and shapes (integers kept): what a published file of that layout holds."
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3 for k, v in encoder.state_dict().items()}


def _to_mmcv(state):
    "timm's resnet*c names (smp's `tu-` prefix dropped) → mmcv's ResNetV1c names, as in open-mmlab://resnet101_v1c."
    from blda.models import MMCV_RESNET_STEM
    back = {new: old for old, new in MMCV_RESNET_STEM.items()}
    def rename(k):
        k = k.removeprefix('model.')
        return next((back[p] + k[len(p):] for p in back if k.startswith(p)), k)
    return {rename(k): v for k, v in state.items()}


@pytest.fixture(scope='module')
def v1c_files(tmp_path_factory):
    "The official V1c layout (state_dict/meta, stem.*, fc, no BatchNorm counters) and torchvision's ResNet-101 layout."
    d = tmp_path_factory.mktemp('weights')
    v1c = build_model('C', num_classes=3).encoder
    mmcv = {k: v for k, v in _to_mmcv(_random_state(v1c)).items() if not k.endswith('num_batches_tracked')}
    assert {'stem.0.weight', 'stem.7.running_var', 'layer3.22.conv2.weight', 'layer4.0.downsample.1.bias'} <= set(mmcv)
    torch.save({'meta': {'epoch': 100}, 'state_dict': mmcv | {'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)}},
               d/'resnet101_v1c.pth')
    tv = build_model('C', num_classes=3, encoder='resnet101').encoder
    torch.save(_random_state(tv) | {'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)}, d/'resnet101.pth')
    return d, mmcv, _random_state(tv)


def test_official_v1c_layout_loads_every_tensor(v1c_files):
    d, mmcv, _ = v1c_files
    model = build_model('C', num_classes=3, encoder_weights=d/'resnet101_v1c.pth')   # the C default: V1c
    own = _to_mmcv(model.encoder.state_dict())
    assert set(own) == set(mmcv) | {k for k in own if k.endswith('num_batches_tracked')}
    for k, v in mmcv.items(): assert torch.equal(own[k], v), k


def test_torchvision_layout_is_an_explicit_option(v1c_files):
    d, _, tv = v1c_files
    model = build_model('C', num_classes=3, encoder='resnet101', encoder_weights=d/'resnet101.pth')
    assert model.encoder.conv1.weight.shape[-1] == 7
    for k, v in model.encoder.state_dict().items(): assert torch.equal(v, tv[k]), k


def test_wrong_layout_is_one_line_naming_the_file(v1c_files):
    d, _, _ = v1c_files
    for encoder, name, hint in ((None, 'resnet101.pth', "torchvision's ResNet layout"),
                                ('resnet101', 'resnet101_v1c.pth', 'deep 3×3 stem')):
        with pytest.raises(EncoderWeightsError) as e: build_model('C', encoder=encoder, encoder_weights=d/name)
        assert '\n' not in str(e.value) and str(d/name) in str(e.value) and hint in str(e.value), str(e.value)

"""Configuration as data: host options from the command line, tables and config.json; the dataset registry;
a library that does not import its command line and leaves the process's global state alone."""
import ast, contextlib, dataclasses, io, json, random, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from blda.cli import main
from blda.hosts import HOSTS, option_specs
from blda.train import TrainConfig

from conftest import assert_same_state, train_once_and_resumed, train_quietly

def tiny(toy: Path, out: Path, *extra: str) -> list[str]:
    "A two-iteration `blda train` on the tiny toy (MiT-B0, 32×32 crops)."
    return ['train', '--data', 'toy', '--source-root', str(toy/'source'), '--target-root', str(toy/'target'),
            '--output-dir', str(out), '--encoder', 'mit_b0', '--embed-dim', '16', '--crop-size', '32', '32',
            '--iterations', '2', '--eval-interval', '0', '--checkpoint-interval', '0', '--min-pixels', '10',
            '--rcs-min-pixels', '10', '--no-progress', *extra]

# ------------------------------------------------------------------------------------------ host options
def test_host_option_is_written_to_config_json_and_compared_on_resume(toy, tmp_path, capsys, monkeypatch):
    import blda.train
    calls = []
    monkeypatch.setattr(blda.train, 'retain_freed_memory', lambda: calls.append(1) or True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(tiny(toy, tmp_path/'run', '--host', 'mic', '--host-option', 'mask_ratio=0.5')) == 0
    assert calls == [1]   # the command line, not the library, changes the allocator
    config = json.loads((tmp_path/'run'/'config.json').read_text())
    assert config['host_options'] == {'mask_ratio': 0.5}
    capsys.readouterr()
    # the same folder with another mask ratio: refused, naming the option
    assert main(tiny(toy, tmp_path/'run', '--host', 'mic', '--host-option', 'mask_ratio=0.6', '--iterations', '3')) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--host-option' in err and '0.5' in err and '0.6' in err

@pytest.mark.parametrize('option, message', [('mask_ration=0.5', "no option 'mask_ration'"),
                                             ('mask_ratio=half', 'mask_ratio must be a float'),
                                             ('mask_ratio=1.5', 'ratio must lie in [0, 1)')])
def test_bad_host_option_is_one_line_listing_the_options(option, message, capsys):
    assert main(['train', '--host', 'mic', '--host-option', option, '--print-config']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('blda train: error: --host-option') and message in err
    assert all(name in err for name in ('mask_block_size', 'mask_ratio', 'mic_weight', 'mask_augment'))

def test_host_option_needs_name_and_value(capsys):
    with pytest.raises(SystemExit): main(['train', '--host', 'mic', '--host-option', 'mask_ratio', '--print-config'])
    assert 'expected NAME=VALUE' in capsys.readouterr().err

@pytest.mark.parametrize('host', sorted(HOSTS))
def test_help_of_each_host_lists_its_options(host):
    with contextlib.redirect_stdout(io.StringIO()) as buf, contextlib.suppress(SystemExit):
        main(['train', '--host', host, '--help'])
    listing = buf.getvalue().split('host options')[-1]
    specs = option_specs(HOSTS[host])
    assert f'--host {host}:' in listing and all(name in listing for name in specs)
    others = {n for h in HOSTS.values() for n in option_specs(h)} - set(specs)
    assert not any(f' {n} ' in listing for n in others)
    if not specs: assert f'--host {host}: none' in listing

def test_options_are_typed_and_defaults_are_official():
    cfg = TrainConfig(host='hrda', host_options={'detail_weight': '0.2', 'attention_embed_dim': 'none', 'fusion': 'upsampled'})
    assert cfg.host_options == {'attention_embed_dim': None, 'detail_weight': 0.2, 'fusion': 'upsampled'}
    assert TrainConfig(host='mic').host_options == {} and HOSTS['mic'].options()['mask_ratio'] == 0.7
    assert HOSTS['hrda'].options()['detail_weight'] == 0.1 and HOSTS['cdac'].options()['attention_weight'] == 1.0
    with pytest.raises(ValueError, match="TrainConfig.host_options: host 'daformer' has no option 'detail_weight'"):
        TrainConfig(host='daformer', host_options={'detail_weight': 0.2})

def test_table_row_and_set_take_host_options(tmp_path):
    from blda.errors import UserError
    from blda.reproduce import _parse_set, notebook_parameters, parse_table, plan_runs
    from blda.experiment import experiment_config, experiment_notebook
    spec = parse_table({'defaults': {'data': 'toy', 'host': 'mic'},
                        'rows': [{'name': 'mic-half', 'params': {'host_options': {'mask_ratio': 0.5}}}]})
    run, = plan_runs(spec, tmp_path, overrides=_parse_set(['host_options.mic_weight=2']))
    assert run.params['host_options'] == {'mask_ratio': 0.5, 'mic_weight': 2.0}
    params = notebook_parameters(run.params, experiment_notebook())   # what the experiment notebook is given
    config = experiment_config(params | {'source_root': '/s', 'target_root': '/t'})
    assert config.host_options == {'mask_ratio': 0.5, 'mic_weight': 2.0}
    with pytest.raises(UserError, match=r"row 'mic-half': host_options: host 'mic' has no option 'mask_ration'.*mask_ratio \(float"):
        plan_runs(spec, tmp_path, overrides=_parse_set(['host_options.mask_ration=0.5']))

# ------------------------------------------------------------------------------------------ hosts composed
def test_hosts_are_recipes_of_parts():
    from blda.hrda import HRDAPart
    from blda.mic import MICPart
    mic, hrda, mic_hrda = HOSTS['mic'], HOSTS['hrda'], HOSTS['mic_hrda']
    assert mic_hrda.parts == hrda.parts + (MICPart(),) and mic.parts == HOSTS['daformer'].parts + (MICPart(),)
    assert type(mic_hrda) is type(hrda) is type(HOSTS['daformer'])   # one Host class: no subclass per method
    assert {f.name for f in dataclasses.fields(type(hrda))} == {'name', 'step', 'rare_class_sampling', 'parts'}
    assert mic_hrda.data == hrda.data and mic_hrda.options() == hrda.options() | mic.options()
    assert isinstance(hrda.with_options(data_scale=1.5).parts[-1], HRDAPart)

# ------------------------------------------------------------------------------------------ dataset registry
def fixture_dataset(root, split='train', scale=None, crop_size=None, cat_max_ratio=0.75, flip_prob=0.5,
                    label_at_full_res=False, pseudo_margins=None, with_labels=True):
    """A layout of no real dataset: ROOT/<split>/<name>_image.png with ROOT/<split>/<name>_label.png (train ids);
    `with_labels=False` (a target's training split) reads no label."""
    from blda.data import SegDataset, SegTransform
    images = sorted((Path(root)/split).glob('*_image.png'))
    labels = [p.with_name(p.name.replace('_image.png', '_label.png')) for p in images] if with_labels else None
    return SegDataset(images, labels, SegTransform(scale, crop_size, cat_max_ratio, flip_prob, label_at_full_res), pseudo_margins)

def test_a_dataset_added_by_one_registry_entry_trains(toy, tmp_path, monkeypatch, capsys):
    from blda.registry import BENCHMARKS, DATASETS, TOY_SOURCE, Benchmark, DatasetEntry
    fixture = tmp_path/'fixture'
    for split in ('train', 'val'):   # the toy's target images, in the fixture's own layout
        (fixture/split).mkdir(parents=True)
        for image in sorted((toy/'target'/'leftImg8bit'/split).glob('*/*_leftImg8bit.png')):
            stem = image.name[:-len('_leftImg8bit.png')]
            shutil.copy(image, fixture/split/f'{stem}_image.png')
            shutil.copy(toy/'target'/'gtFine'/split/image.parent.name/f'{stem}_gtFine_labelTrainIds.png', fixture/split/f'{stem}_label.png')
    entry = DatasetEntry('fixture', '<split>/*_image.png and *_label.png', fixture_dataset, '{split}/*_image.png')
    monkeypatch.setitem(DATASETS, 'fixture', entry)                                       # the dataset
    monkeypatch.setitem(BENCHMARKS, 'toy2fixture', Benchmark('toy2fixture', TOY_SOURCE, entry, (32, 32)))   # the pair
    ini = tmp_path/'settings.ini'   # settings.ini takes the new dataset's root
    ini.write_text(f"[paths]\ntoy = {toy}\nfixture = {fixture}\nresults = {tmp_path/'results'}\n")
    monkeypatch.setenv('BLDA_SETTINGS', str(ini))
    assert main(['train', '--data', 'toy2fixture', '--host', 'dacs', '--encoder', 'mit_b0', '--embed-dim', '16',
                 '--iterations', '2', '--eval-interval', '2', '--min-pixels', '10', '--no-progress']) == 0
    run = tmp_path/'results'/'toy2fixture-dacs-T-s0'
    config = json.loads((run/'config.json').read_text())
    assert (config['source_root'], config['target_root']) == (str(toy/'source'), str(fixture))
    last = [json.loads(line) for line in (run/'metrics.jsonl').read_text().splitlines()][-1]
    assert last['kind'] == 'eval' and last['images'] == len(list((fixture/'val').glob('*_image.png')))
    assert 'toy2fixture' in capsys.readouterr().out

# ------------------------------------------------------------------------------------------ layering and side effects
CLI_MODULES = {'cli', 'train_cli', 'evaluate_cli', 'settings_cli'}

def test_library_never_imports_the_command_line():
    import blda
    package = Path(blda.__file__).parent
    offenders = []
    for path in sorted(package.glob('*.py')):
        if path.stem in CLI_MODULES | {'__main__', '_modidx'}: continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import): names = [a.name for a in node.names if a.name.startswith('blda')]
            elif isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or '').startswith('blda')):
                names = [node.module or ''] + [a.name for a in node.names]   # `from .cli import x`, `from blda import cli`
            else: continue
            offenders += [f"{path.name}: {n}" for n in names if n.split('.')[-1] in CLI_MODULES]
    assert not offenders, offenders

def test_train_leaves_the_callers_random_state_and_resumes_bit_exact(toy, tmp_path, monkeypatch):
    import blda.train
    monkeypatch.setattr(blda.train, 'retain_freed_memory', lambda: pytest.fail('the library changed the allocator'))
    random.seed(11); np.random.seed(11); torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(11); np.random.seed(11); torch.manual_seed(11)
    cfg = TrainConfig(host='mic', host_options={'mask_ratio': 0.5, 'mask_block_size': 4}, blda=True, data='toy',
                      source_root=str(toy/'source'), target_root=str(toy/'target'), output_dir=str(tmp_path/'once'),
                      encoder='mit_b0', embed_dim=16, crop_size=(32, 32), iterations=4, eval_interval=0, min_pixels=10,
                      rcs_min_pixels=10, pseudo_threshold=0.3, log_interval=1, progress=False)
    once, twice = train_once_and_resumed(cfg)
    after = (random.random(), np.random.rand(), torch.rand(3))
    assert after[:2] == expected[:2] and torch.equal(after[2], expected[2])
    assert_same_state(once, twice, ('student', 'teacher', 'criterion'))
    assert [r['mic'] for r in once.log] == [r['mic'] for r in twice.log]
    # a different host option is a different run: resuming it is refused
    with pytest.raises(ValueError, match='host_options'):
        train_quietly(dataclasses.replace(cfg, host_options={'mask_ratio': 0.6}, iterations=5))

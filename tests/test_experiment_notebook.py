"""The experiment notebook (`nbs/experiments/uda.ipynb`) has one source of defaults: `TrainConfig`.

Its parameters cell must show `TrainConfig`'s default for every `TrainConfig` field it lists, so that a hand
run and a `blda reproduce` run (which fills the fields a row leaves out with `TrainConfig`'s defaults,
`blda.reproduce.notebook_parameters`) with the same visible values are the same run."""
import ast, dataclasses, json
from pathlib import Path
import pytest
from blda.experiment import REPORT_PARAMETERS
from blda.train import TrainConfig

NOTEBOOK = Path(__file__).resolve().parents[1]/'nbs'/'experiments'/'uda.ipynb'


def parameters_cell(path: Path = NOTEBOOK) -> str:
    "The source of the notebook's only cell tagged `parameters` (the cell papermill injects after)."
    cells = [c for c in json.loads(path.read_text())['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(cells) == 1, f"{path} must have exactly one cell tagged 'parameters', found {len(cells)}"
    return ''.join(cells[0]['source'])


def literal_parameters(source: str) -> dict:
    "name → value of each top-level `name: type = literal` (or `name = literal`) of a parameters cell."
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)): continue
        assert isinstance(node, (ast.AnnAssign, ast.Assign)), f"not a parameter assignment: {ast.unparse(node)}"
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
        assert isinstance(target, ast.Name) and node.value is not None, ast.unparse(node)
        values[target.id] = ast.literal_eval(node.value)     # a parameter is a literal, as papermill needs
    return values


def train_config_defaults() -> dict:
    "TrainConfig's default of each field that has one (tuples as lists: a notebook shows JSON-like literals)."
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING: value = f.default
        elif f.default_factory is not dataclasses.MISSING: value = f.default_factory()
        else: continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def mismatches(params: dict, defaults: dict) -> list[str]:
    return [f"{name} = {params[name]!r} in the notebook, {defaults[name]!r} in TrainConfig"
            for name in sorted(set(params) & set(defaults))
            if params[name] != defaults[name] or type(params[name]) is not type(defaults[name])
            and not (isinstance(defaults[name], float) and isinstance(params[name], int))]


def test_parameters_cell_shows_train_configs_defaults():
    params, defaults = literal_parameters(parameters_cell()), train_config_defaults()
    shown = set(params) & set(defaults)
    assert len(shown) >= 20, f"the parameters cell lists only {sorted(shown)} of TrainConfig's fields"
    wrong = mismatches(params, defaults)
    assert not wrong, ("the experiment notebook's parameters cell must show TrainConfig's defaults (blda.train), "
                       "or a hand run and `blda reproduce` differ: " + '; '.join(wrong))
    unknown = set(params) - set(defaults) - set(REPORT_PARAMETERS)
    assert not unknown, f"parameters that are neither TrainConfig fields nor report parameters: {sorted(unknown)}"


def test_the_check_fails_on_a_changed_default():
    "The comparison above can fail: a cell with the notebook's old toy values is caught, field by field."
    edited = parameters_cell().replace("lr: float = 6e-05", "lr: float = 6e-4").replace(
        "gmm_warmup: int = 1500", "gmm_warmup: int = 30")
    wrong = mismatches(literal_parameters(edited), train_config_defaults())
    assert [w.split(' = ')[0] for w in wrong] == ['gmm_warmup', 'lr']
    with pytest.raises(AssertionError, match='not a parameter assignment'):
        literal_parameters("x = 1\nprint(x)")


def test_reproduce_fills_what_a_row_leaves_out_with_the_cells_values():
    "What `blda reproduce` passes for an empty row equals what a hand run of the notebook uses."
    from blda.reproduce import notebook_parameters
    params = literal_parameters(parameters_cell())
    filled = notebook_parameters({}, NOTEBOOK)
    assert filled and all(params[name] == value for name, value in filled.items()), filled

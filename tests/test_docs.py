"""`blda docs`: one HTML page per notebook (library and tutorials) from the committed outputs, an index in
reading order, and a folder replaced as a whole (never half-written, never someone else's)."""
import json, re
from pathlib import Path

import pytest

from blda.cli import main
from blda.docs import MARKER, UNRENDERED, build_docs, default_nbs, find_pages

REPO = Path(__file__).resolve().parents[1]
NBS = REPO/'nbs'


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    "The real notebooks rendered once through the command line (about 15 s on one core)."
    out = tmp_path_factory.mktemp('docs')/'site'
    assert main(['docs', '--nbs', str(NBS), '--out', str(out), '--quiet']) == 0
    return out


def test_one_page_per_notebook(site):
    notebooks = sorted(NBS.glob('*.ipynb')) + sorted((NBS/'tutorials').glob('*.ipynb'))
    expected = {p.relative_to(NBS).with_suffix('.html').as_posix() for p in notebooks}
    written = {p.relative_to(site).as_posix() for p in site.rglob('*.html')}
    assert expected and written == expected | {'index.html'}
    assert (NBS/'tutorials').is_dir() and any(p.startswith('tutorials/') for p in written)
    for page in find_pages(NBS):                                  # each page is its notebook, with its title
        text = (site/page.href).read_text()
        assert f'<title>{page.title}</title>' in text.replace('&amp;', '&') and len(text) > 10_000


def test_index_lists_tutorials_first_in_reading_order(site):
    index = (site/'index.html').read_text()
    links = re.findall(r'<a href="([^"]+)">', index)
    tutorials = [l for l in links if l.startswith('tutorials/')]
    assert links[:len(tutorials)] == tutorials == sorted(tutorials)      # tutorials first, by number
    assert links[len(tutorials):] == sorted(links[len(tutorials):])      # then the library, by number
    assert set(links) == {p.relative_to(site).as_posix() for p in site.rglob('*.html')} - {'index.html'}


def test_links_point_to_pages_and_directives_are_gone(site):
    for page in site.rglob('*.html'):
        text = page.read_text()
        assert not re.search(r'<a [^>]*href="(?![a-z]+:)[^"]*\.ipynb', text), page   # notebook links → pages
        for target in re.findall(r'<a [^>]*href="((?:\.\./)?[\w/]+\.html)', text):    # and the pages exist
            assert (page.parent/target).resolve().is_file(), (page, target)
    settings = (site/'00_settings.html').read_text()
    assert 'default_exp' not in settings and '#| export' not in settings


def test_pages_load_nothing_from_the_network_and_formulas_are_mathml(site):
    "Offline (or opened as files) a page must read the same: no CDN script or style, every formula already MathML."
    remote = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["\']?(?:https?:)?//|import\(\s*["\']https?:|@import\s+url\(\s*["\']?https?:')
    for page in site.rglob('*.html'):
        text = page.read_text()
        assert not remote.search(text), (page, remote.search(text).group(0))
        assert 'MathJax.Hub' not in text, page                          # nor MathJax's configuration
        assert f'class="{UNRENDERED}"' not in text, page               # every formula of the notebooks converted
        assert not re.search(r'mathvariant="(?!normal")', text), page  # Chromium draws only "normal"; ℙ, ℳ are letters
    tutorial = (site/'tutorials'/'03_posthoc_alignment.html').read_text()
    body = tutorial.split('<body', 1)[1]
    assert body.count('<math') >= 10 and 'display="block"' in body and '<mo>arg</mo>' in body
    assert not re.search(r'\$[^$<>]*\\(?:tilde|max|frac|mathcal)', body)    # no raw TeX left in the prose


def test_formula_that_cannot_be_converted_shows_as_tex(tmp_path, capsys):
    nb = {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {},
          'cells': [{'cell_type': 'markdown', 'id': 'a', 'metadata': {},
                     'source': '# F\n\nKnown $\\frac{a}{b}$; unknown $\\nosuchcommand{x}$.'}]}
    (tmp_path/'nbs').mkdir(); (tmp_path/'nbs'/'00_f.ipynb').write_text(json.dumps(nb))
    build_docs(tmp_path/'nbs', tmp_path/'site')
    text = (tmp_path/'site'/'00_f.html').read_text()
    assert '<mfrac>' in text and f'<code class="{UNRENDERED}">$\\nosuchcommand{{x}}$</code>' in text
    assert '1 formula(s) could not be converted' in capsys.readouterr().err


def test_failed_render_keeps_previous_folder(tmp_path):
    nbs = tmp_path/'nbs'; nbs.mkdir()
    good = {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {},
            'cells': [{'cell_type': 'markdown', 'id': 'a', 'metadata': {}, 'source': '# Good\n\n> fine'}]}
    (nbs/'00_good.ipynb').write_text(json.dumps(good))
    out = tmp_path/'site'
    assert [p.href for p in build_docs(nbs, out)] == ['00_good.html']
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = dict(good, cells=[{'cell_type': 'code', 'id': 'b', 'metadata': {}}])             # a cell without source
    (nbs/'01_bad.ipynb').write_text(json.dumps(bad))
    with pytest.raises(ValueError, match='01_bad.ipynb'):
        build_docs(nbs, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before            # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ['nbs', 'site']        # no temporary folder left
    assert main(['docs', '--nbs', str(nbs), '--out', str(out), '--quiet']) == 2  # one line, no traceback


def test_uncleaned_notebook_renders(tmp_path):
    "`nbdev-test --save` leaves execution timings (floats) in cell metadata, which nbformat's schema rejects."
    cell = {'cell_type': 'code', 'id': 'c', 'execution_count': 1, 'source': 'x = 1', 'outputs': [],
            'metadata': {'execution': {'total': 2.5, 'iopub.execute_input': '2026-01-01T00:00:00'}}}
    (tmp_path/'nbs').mkdir()
    (tmp_path/'nbs'/'00_run.ipynb').write_text(json.dumps({'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': [cell]}))
    assert [p.href for p in build_docs(tmp_path/'nbs', tmp_path/'site')] == ['00_run.html']
    assert 'x' in (tmp_path/'site'/'00_run.html').read_text()


def test_refuses_foreign_or_file_output(tmp_path, capsys):
    (tmp_path/'nbs').mkdir()
    (tmp_path/'nbs'/'00_a.ipynb').write_text(json.dumps({'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': []}))
    mine = tmp_path/'mine'; mine.mkdir(); (mine/'notes.txt').write_text('keep')
    assert main(['docs', '--nbs', str(tmp_path/'nbs'), '--out', str(mine)]) == 2
    assert 'refusing to replace' in capsys.readouterr().err and (mine/'notes.txt').read_text() == 'keep'
    (tmp_path/'file').write_text('x')
    assert main(['docs', '--nbs', str(tmp_path/'nbs'), '--out', str(tmp_path/'file')]) == 2
    empty = tmp_path/'empty'; empty.mkdir()                                     # an empty folder is fine
    assert main(['docs', '--nbs', str(tmp_path/'nbs'), '--out', str(empty), '--quiet']) == 0
    assert (empty/MARKER).exists() and (empty/'00_a.html').exists()
    assert main(['docs', '--nbs', str(tmp_path/'nothing'), '--out', str(empty)]) == 2


def test_default_notebook_folder_is_this_checkout():
    assert default_nbs() == NBS

"""`make lab`: JupyterLab serves the notebooks of `nbs/` with this environment's kernel.

The server starts headless on the loopback address with a token, a notebook is read through its REST API
(`/api/contents/…`), a request without the token is refused, and the server stops, all in bounded time."""
import json, os, secrets, signal, socket, subprocess, sys, time
import urllib.error, urllib.request
from pathlib import Path
import pytest

pytest.importorskip('jupyterlab', reason='JupyterLab is not installed (the lab extra)')
NBS = Path(__file__).resolve().parents[1]/'nbs'
START_TIMEOUT, STOP_TIMEOUT = 90, 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={'Authorization': f'token {token}'} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r: return r.status, r.read()
    except urllib.error.HTTPError as e: return e.code, e.read()


def test_lab_serves_a_notebook_through_the_rest_api(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    base = f'http://127.0.0.1:{port}'
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path/'config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'),
           'JUPYTERLAB_SETTINGS_DIR': str(tmp_path/'settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'workspaces')}
    log = open(tmp_path/'lab.log', 'wb')
    server = subprocess.Popen(
        [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
         '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={NBS}',
         *(['--allow-root'] if os.geteuid() == 0 else [])],                # containers and CI often run as root
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert server.poll() is None, f"JupyterLab exited early:\n{(tmp_path/'lab.log').read_text()[-3000:]}"
            try:
                if get(f'{base}/api/status', token, timeout=2)[0] == 200: break
            except OSError: pass
            assert time.monotonic() < deadline, f"JupyterLab did not answer within {START_TIMEOUT} s"
            time.sleep(0.5)

        status, body = get(f'{base}/api/contents/03_tracker.ipynb?content=1&type=notebook', token)
        assert status == 200, body[:500]
        model = json.loads(body)
        assert model['type'] == 'notebook' and model['name'] == '03_tracker.ipynb'
        cells = model['content']['cells']
        assert cells[0]['source'].startswith('# The logit-distribution tracker')
        assert any('LogitTracker' in c['source'] for c in cells if c['cell_type'] == 'code')

        listing = json.loads(get(f'{base}/api/contents/?content=1', token)[1])
        names = {item['name'] for item in listing['content']}
        assert {'02_gmm.ipynb', 'tutorials', 'experiments'} <= names      # the server's root is nbs/

        kernels = json.loads(get(f'{base}/api/kernelspecs', token)[1])
        assert 'python3' in kernels['kernelspecs']                       # this environment's ipykernel

        assert get(f'{base}/api/contents/03_tracker.ipynb', None)[0] == 403   # no token, no notebook
    finally:
        if server.poll() is None: os.killpg(server.pid, signal.SIGTERM)
        try: server.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL); server.wait(timeout=10)
        log.close()
    assert server.returncode is not None
    assert 'Shutting down' in (tmp_path/'lab.log').read_text()              # stopped cleanly on SIGTERM, not killed

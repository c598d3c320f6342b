"""Hub download against a local HTTP server that speaks the Hub's URL layout (no internet needed)."""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import model as M
from plumbing import hub as hub_client  # `hub` is this file's fake-Hub fixture
from conftest import ROOT, make_config, make_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "test-org/tiny-llama"
SECRET = "hf_SECRETtoken1234567890"


class FakeHub:
    """Serves repos {repo_id: {path: bytes}} like huggingface.co; records every request.

    Knobs: gated (repo ids answering 401 without a token, 403 with one), cut_once (paths whose first
    download dies halfway), truncate / corrupt (paths served short / with a flipped byte),
    no_range (answer Range requests with the whole file, status 200), wait_for_clients (serve no file
    before this many revision requests came in), file_delay (seconds before each file is served).
    """

    def __init__(self, repos):
        self.repos, self.log = repos, []
        self.gated, self.cut_once, self.truncate, self.corrupt = set(), set(), set(), set()
        self.no_range = False
        self.wait_for_clients, self.file_delay = 0, 0.0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.log.append({"path": self.path, "range": self.headers.get("Range"),
                                "auth": self.headers.get("Authorization")})
                try:
                    hub.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def resolve_requests(self):
        return [r for r in self.log if "/resolve/" in r["path"]]

    @staticmethod
    def tree(files):
        """The top folder's entries: files with size, git oid and (LFS) sha256; sub-folders by name."""
        out = [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0}
               for d in sorted({p.split("/")[0] for p in files if "/" in p})]
        for path, data in sorted((p, d) for p, d in files.items() if "/" not in p):
            entry = {"type": "file", "path": path, "size": len(data),
                     "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if path.endswith((".safetensors", ".bin")):  # large files live in LFS: sha256 given
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def handle(self, h):
        m = (re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)(\?.*)?", h.path)
             or re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", h.path))
        if not m or m.group(1) not in self.repos:
            return self.reply(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        repo, kind, rev = m.group(1), m.group(2), m.group(3)
        if repo in self.gated:
            code = 403 if h.headers.get("Authorization") else 401
            return self.reply(h, code, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
        files = self.repos[repo]
        if rev not in ("main", COMMIT):
            return self.reply(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"})
        if kind == "revision":
            body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": p} for p in files]}
            return self.reply(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        if kind == "tree":  # pages of 4 entries, chained by Link headers as the Hub does for long lists
            start = int((re.search(r"cursor=(\d+)", m.group(4) or "") or [0, 0])[1])
            page, headers = self.tree(files)[start:start + 4], {"Content-Type": "application/json"}
            if start + 4 < len(files):
                headers["Link"] = f'<{self.url}/api/models/{repo}/tree/{rev}?cursor={start + 4}>; rel="next"'
            return self.reply(h, 200, json.dumps(page).encode(), headers)
        path = m.group(4)
        deadline = time.time() + 60
        while sum("/revision/" in r["path"] for r in self.log) < self.wait_for_clients and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(self.file_delay)
        if path not in files:
            return self.reply(h, 404, b"{}", {"X-Error-Code": "EntryNotFound"})
        data = files[path]
        if path in self.truncate:
            data = data[: len(data) * 2 // 3]
        if path in self.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        if path in self.cut_once:  # promise the whole file, send half, hang up
            self.cut_once.discard(path)
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        rng = h.headers.get("Range")
        if rng and not self.no_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            return self.reply(h, 206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        return self.reply(h, 200, data)

    @staticmethod
    def reply(h, code, body, headers=()):
        h.send_response(code)
        for k, v in dict(headers).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory):
    """A sharded tiny checkpoint, plus files a checkpoint does not need (they must not be fetched)."""
    torch.manual_seed(0)
    tok = make_tokenizer()
    model = M.Transformer(make_config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    path = M.save(model, tok, tmp_path_factory.mktemp("src") / "tiny", max_shard_size=60_000)
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    assert sum(n.endswith(".safetensors") for n in files) >= 3
    files.update({"README.md": b"# tiny\n", "pytorch_model.bin": b"\0" * 5000, "original/consolidated.pth": b"x"})
    return path, files


@pytest.fixture
def hub(repo_files, tmp_path, monkeypatch):
    fake = FakeHub({REPO: repo_files[1], "meta-llama/Llama-3.2-1B": repo_files[1]})
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token file from the real home
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_client.time, "sleep", lambda s: None)  # no back-off pauses in tests
    monkeypatch.setattr(hub_client, "_DOWNLOAD_CHUNK", 4096)      # our files are ~100 kB, not GBs
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def _logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 2, 7]]))


def test_full_download_uses_hub_layout_and_loads(hub, repo_files, tmp_path):
    model, tok = M.load(REPO, dtype="float32")
    ref, _ = M.load(repo_files[0], dtype="float32")
    assert torch.equal(_logits(model), _logits(ref))
    # only checkpoint files were fetched, each once, from HF_ENDPOINT's server
    fetched = sorted(r["path"].rsplit("/", 1)[-1] for r in hub.resolve_requests())
    wanted = sorted(n for n in repo_files[1] if n.endswith((".json", ".safetensors")))
    assert fetched == wanted
    # the Hugging Face cache layout: refs/main -> commit; snapshot files are links into blobs/
    repo_dir = tmp_path / "cache" / "models--test-org--tiny-llama"
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    snap = repo_dir / "snapshots" / COMMIT
    shard = next(snap.glob("model-*.safetensors"))
    assert shard.is_symlink()
    assert shard.resolve().parent == (repo_dir / "blobs").resolve()
    assert shard.resolve().name == hashlib.sha256(repo_files[1][shard.name]).hexdigest()
    assert not list((repo_dir / "blobs").glob("*.incomplete"))


def test_second_load_makes_no_file_requests_and_offline_works(hub, monkeypatch):
    M.load(REPO)
    hub.log.clear()
    M.load(REPO)
    assert hub.log and not hub.resolve_requests()  # metadata only
    hub.log.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    M.load(REPO)
    assert hub.log == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())  # network gone: the complete cache still serves
    M.load(REPO)


def test_existing_hf_cache_snapshot_is_reused(hub, repo_files, tmp_path):
    """A snapshot laid out as huggingface_hub leaves it (here: plain files, its no-symlink mode)."""
    repo_dir = tmp_path / "cache" / "models--meta-llama--Llama-3.2-1B"
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, data in repo_files[1].items():
        if name.endswith((".json", ".safetensors")):
            (snap / name).write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    path = hub_client.resolve_checkpoint("llama-3.2-1b")  # an alias of that repo
    assert path == snap and not hub.resolve_requests()


def test_two_processes_downloading_one_repo_fetch_each_file_once(hub, repo_files):
    """Two real processes download one repo into one cache at the same time: each file is fetched
    once (one waits on the other's per-file lock, saying so) and both get complete files."""
    hub.wait_for_clients = 2  # no file is served before both processes have asked for the repo ...
    hub.file_delay = 0.3      # ... and each takes a while, so one meets the other mid-download
    code = "import sys; from plumbing import hub; print(hub.download(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, REPO], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    (out_a, err_a), (out_b, err_b) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err_a + err_b
    fetched = sorted(r["path"].rsplit("/", 1)[-1] for r in hub.resolve_requests())
    wanted = sorted(n for n in repo_files[1] if n.endswith((".json", ".safetensors")))
    assert fetched == wanted  # each checkpoint file once, not once per process
    for out in (out_a, out_b):
        snap = Path(out.strip())
        assert {n: (snap / n).read_bytes() for n in wanted} == {n: repo_files[1][n] for n in wanted}
    waited = [err for err, other in ((err_a, procs[1]), (err_b, procs[0]))
              if f"waiting for the process (pid {other.pid}) that holds " in err]
    assert waited and f"(download of {REPO} " in waited[0]


def test_resume_after_broken_transfer(hub, repo_files, tmp_path):
    shard = sorted(n for n in repo_files[1] if n.startswith("model-"))[0]
    hub.cut_once.add(shard)
    path = hub_client.download(REPO)
    assert (path / shard).read_bytes() == repo_files[1][shard]
    tries = [r for r in hub.resolve_requests() if r["path"].endswith(shard)]
    assert len(tries) == 2 and tries[0]["range"] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", tries[1]["range"]).group(1))
    assert 0 < start <= len(repo_files[1][shard]) // 2  # resumed from what had arrived


def test_resume_partial_file_from_an_earlier_run(hub, repo_files, tmp_path):
    shard = sorted(n for n in repo_files[1] if n.startswith("model-"))[1]
    data = repo_files[1][shard]
    blobs = tmp_path / "cache" / "models--test-org--tiny-llama" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / (hashlib.sha256(data).hexdigest() + ".incomplete")).write_bytes(data[:1000])
    path = hub_client.download(REPO)
    assert (path / shard).read_bytes() == data
    assert [r["range"] for r in hub.resolve_requests() if r["path"].endswith(shard)] == ["bytes=1000-"]


def test_server_that_ignores_range_still_gives_the_right_file(hub, repo_files):
    shard = sorted(n for n in repo_files[1] if n.startswith("model-"))[0]
    hub.cut_once.add(shard)
    hub.no_range = True  # answers 200 + whole file: the partial must be overwritten, not appended to
    path = hub_client.download(REPO)
    assert (path / shard).read_bytes() == repo_files[1][shard]


def test_gated_repo_without_token_says_how_to_get_access(hub):
    hub.gated.add(REPO)
    with pytest.raises(PermissionError) as e:
        M.load(REPO)
    msg = str(e.value)
    assert "401" in msg and "HF_TOKEN" in msg and "license" in msg and f"{hub.url}/{REPO}" in msg
    assert "settings/tokens" in msg


def test_token_is_sent_but_never_shown(hub, monkeypatch):
    hub.gated.add(REPO)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(PermissionError) as e:
        M.load(REPO)
    assert hub.log[0]["auth"] == f"Bearer {SECRET}"
    assert "403" in str(e.value) and "has no access" in str(e.value)
    shown = "".join(traceback.format_exception(e.value)) + repr(e.value)
    assert SECRET not in shown


def test_cli_error_for_gated_repo_hides_token(hub, monkeypatch):
    import subprocess
    import sys
    hub.gated.add(REPO)
    env = dict(os.environ, HF_TOKEN=SECRET)
    r = subprocess.run([sys.executable, str(Path(M.__file__)), "--model", REPO, "--prompt", "hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "access denied" in r.stderr and "Traceback" not in r.stderr and SECRET not in r.stderr


def test_missing_repo_says_not_found(hub):
    with pytest.raises(FileNotFoundError, match=r"(?s)not found.*check the repo name.*no local folder"):
        M.load("test-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="RevisionNotFound"):
        hub_client.download(REPO, revision="v9")


def test_truncated_download_is_detected_and_discarded(hub, repo_files, tmp_path):
    shard = sorted(n for n in repo_files[1] if n.startswith("model-"))[0]
    hub.truncate.add(shard)
    with pytest.raises(ValueError, match=rf"{shard}.*received \d+ bytes but the Hub lists {len(repo_files[1][shard])}"):
        hub_client.download(REPO)
    blobs = tmp_path / "cache" / "models--test-org--tiny-llama" / "blobs"
    assert not list(blobs.glob(hashlib.sha256(repo_files[1][shard]).hexdigest() + "*"))
    hub.truncate.clear()
    hub.corrupt.add(shard)
    with pytest.raises(ValueError, match="sha256"):
        hub_client.download(REPO)
    assert not list(blobs.glob(hashlib.sha256(repo_files[1][shard]).hexdigest() + "*"))
    hub.corrupt.clear()
    assert (hub_client.download(REPO) / shard).read_bytes() == repo_files[1][shard]  # a clean retry works


def _closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_no_network_names_the_local_folder_layout(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    with pytest.raises(ConnectionError) as e:
        M.load(REPO)
    msg = str(e.value)
    for needed in ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                   "tokenizer_config.json", "local folder", "--model"):
        assert needed in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="(?s)HF_HUB_OFFLINE.*tokenizer.json"):
        M.load(REPO)


def test_repo_without_safetensors_is_refused_before_downloading(hub, repo_files):
    hub.repos["test-org/bin-only"] = {k: v for k, v in repo_files[1].items() if not k.startswith("model")}
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hub_client.download("test-org/bin-only")
    assert not hub.resolve_requests()

"""The judge client's resilience: retries, a rate limit, a deadline per attempt, a resumable cache, threads.

Plumbing for classify.py, whose JudgeClient says what one request is (URL, headers, JSON body) and how
to read its answer; `ResilientClient` here sends many of them: a thread pool, a requests-per-minute
limit, retries with exponential backoff and jitter (Retry-After wins), a deadline per whole attempt,
and a persistent JSONL cache so a rerun after a crash or Ctrl-C never pays twice. Refusals and answers
cut at max_tokens are failures with their reason, never cached answers. Also the command line shared
by classify.py and curate.py (the judge flags, error handling, a rerun's settings check) and the
prompt templates' placeholders and files (--prompts-dir, --dump-prompts). Nothing here imports a core file.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from tqdm import tqdm
from urllib3.exceptions import HTTPError as _TransportError  # requests' transport (a dependency)

from plumbing.files import FolderLocked, write_text_atomic


@dataclass
class JudgeConfig:
    api: str = "openai"          # "openai" (any /v1/chat/completions server) or "anthropic"
    base_url: str = ""           # "" = the API's public address; with or without a trailing /v1
    model: str = ""              # "" = the paper's model for this API (classify.API_DEFAULTS)
    api_key_env: str = ""        # NAME of the environment variable holding the key ("" = usual)
    temperature: float = 0.0     # the original classifier ran at 1.0 (D-E2); 0 is reproducible
    max_tokens: int = 512
    concurrency: int = 8         # requests in flight
    rpm: float = 0.0             # requests per minute (every attempt counts); 0 = no limit
    max_retries: int = 6         # retries after the first attempt, then the item is "failed"
    backoff_base: float = 1.0    # seconds; attempt k waits base * 2**k * U(0.5, 1], at most max
    backoff_max: float = 60.0
    timeout: float = 120.0       # seconds for one whole HTTP attempt (connect, wait, full body)
    cache: str = ""              # JSONL cache path ("" = no cache)
    seed: int = 0                # for the backoff jitter only; it never changes a result
    progress: bool = True


class JudgeError(RuntimeError):
    """A failure no retry can fix (bad key, unknown model or URL): the whole run stops."""


@dataclass
class Reply:
    text: str | None             # None when the request failed
    error: str | None = None     # why it failed (key scrubbed)
    cached: bool = False
    tokens: int = 0


def normalize_base_url(url):
    """'http://h:8000', 'http://h:8000/' and 'http://h:8000/v1' all mean the same server."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not re.match(r"^https?://", url):
        raise ValueError(f"--base-url must start with http:// or https://, got {url!r}")
    return url


def _retry_after_seconds(value):
    """Retry-After is either seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Stopped(Exception):
    pass


class _DeadlineExceeded(Exception):
    pass


def read_body_within(r, deadline):
    """Read a streamed response's body, giving up at time.monotonic() > deadline.

    requests' own timeout bounds each socket wait, not the whole answer: a server that trickles
    a byte every few seconds would keep an attempt alive for ever. read1 returns whatever has
    arrived, so the deadline is checked between arrivals (a server that falls silent is cut by
    the socket timeout, the same number of seconds, so an attempt never lasts more than about
    twice the deadline). A connection closed before
    Content-Length bytes arrived raises (urllib3's IncompleteRead), which the caller retries.
    The body is then stored where requests keeps it, so r.json() and r.text work as usual.
    """
    chunks = []
    while True:
        if time.monotonic() > deadline:
            raise _DeadlineExceeded
        chunk = r.raw.read1(1 << 16, decode_content=True)
        if not chunk:
            break
        chunks.append(chunk)
    r._content, r._content_consumed = b"".join(chunks), True
    return r._content


class ResilientClient:
    """Send many (system, user) prompts; return one Reply per prompt, in order.

    A subclass (classify.JudgeClient) sets self.base_url, self.model, self.key_env and self.endpoint,
    then calls this __init__ with the key, and defines the wire format: _headers(), _body(system, user),
    _send(session, body) -> the response with its body read, and _parse(data) -> (text, tokens, problem).

    Identical requests are sent once: the cache key is sha256 over (api, base url, model, system,
    messages, temperature, max_tokens). Each completed request is appended to the cache file
    (one flushed JSON line) by the worker thread that paid for it, so even a request that finishes
    while the run is being interrupted is kept; memory holds only {key: line offset}. Failed
    requests, refusals and answers cut at max_tokens are not cached: a rerun asks again.
    """

    def __init__(self, cfg: JudgeConfig, key):
        self.cfg = cfg
        self._key = key
        if cfg.concurrency < 1 or cfg.max_retries < 0 or cfg.timeout <= 0:
            raise ValueError("need --concurrency >= 1, --max-retries >= 0 and --timeout > 0")
        self._local = threading.local()          # one requests.Session per worker thread
        self._lock = threading.Lock()            # cache file, counters
        self._rate_lock = threading.Lock()
        self._next_slot = 0.0
        self._stop = threading.Event()
        self._rng = random.Random(cfg.seed)
        self.stats = dict(sent=0, cached=0, failed=0, refused=0, truncated=0, tokens=0)
        self._cache = {}
        self._cache_path = Path(cfg.cache) if cfg.cache else None
        if self._cache_path is not None:
            self._load_cache()
        if self._key is None:
            print(f"[judge] environment variable {self.key_env} is not set: sending requests "
                  "without a key (fine for a local server)", file=sys.stderr)

    # --- secrets ---------------------------------------------------------------------------------
    def scrub(self, text):
        """Remove the API key from any text that may reach a log, a file or an exception."""
        text = str(text)
        if self._key:
            text = text.replace(self._key, "***")
        return text

    # --- cache -----------------------------------------------------------------------------------
    def _load_cache(self):
        """Index the cache file: {key: byte offset of its line}. The answers stay on disk (a paper-
        sized run caches a million answers of up to 1,024 tokens each) and are read back when a
        prompt asks for them. The file is streamed, never read whole."""
        p = self._cache_path
        if not p.exists():
            return
        bad, offset, last = 0, 0, b"\n"
        with open(p, "rb") as f:
            for line in f:
                start, offset, last = offset, offset + len(line), line
                if not line.strip():
                    continue
                try:
                    self._cache[json.loads(line)["key"]] = start
                except (ValueError, KeyError, TypeError):
                    bad += 1  # a line cut short by a kill: that request is simply asked again
        if not last.endswith(b"\n"):
            with open(p, "ab") as f:  # so the next appended line does not glue onto the stub
                f.write(b"\n")
        if bad:
            print(f"[judge] skipped {bad} unreadable line(s) in the cache {p}", file=sys.stderr)

    def _store(self, key, rec):
        """Keep an answer: appended to the cache file (one flushed line; the index keeps its
        offset), or in memory when there is no cache file. Call with self._lock held."""
        if self._cache_path is None:
            self._cache[key] = rec
            return
        self._cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._cache_path, "ab") as f:
            offset = os.fstat(f.fileno()).st_size
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
        self._cache[key] = offset

    def _record(self, entry, f):
        """The cached record behind an index entry (a dict in memory, or an offset in file f)."""
        if isinstance(entry, dict):
            return entry
        f.seek(entry)
        return json.loads(f.readline())

    def request_key(self, system, user):
        blob = json.dumps(dict(api=self.cfg.api, base_url=self.base_url, model=self.model,
                               system=system, messages=[{"role": "user", "content": user}],
                               temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens),
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    # --- retries ----------------------------------------------------------------------------------
    def _server_message(self, r):
        try:
            err = r.json().get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            msg = None
        return self.scrub((msg or r.text or r.reason or "")[:500])

    def _wait_for_slot(self):
        """Requests-per-minute limit: attempts start at least 60/rpm seconds apart."""
        if self.cfg.rpm <= 0:
            return
        with self._rate_lock:
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + 60.0 / self.cfg.rpm
        if self._stop.wait(start - now):
            raise _Stopped

    def _backoff(self, attempt):
        with self._lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        return min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** attempt) * jitter

    def _call(self, system, user):
        """One prompt with retries -> (text, tokens) or (None, reason). Raises JudgeError.

        Retried: 429, 408, 5xx (Anthropic's 529 "overloaded" included; Retry-After, when sent,
        sets the wait), timeouts, broken connections (also mid-body), malformed JSON. Not
        retried: other 4xx. A refusal or an answer cut at max_tokens is retried only when the
        temperature is above 0: at temperature 0 the same request gets the same answer again.
        Each attempt must finish, body included, within cfg.timeout seconds.
        """
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        body, reason = self._body(system, user), "no attempt made"
        tries = self.cfg.max_retries + 1
        for attempt in range(tries):
            if self._stop.is_set():
                raise _Stopped
            self._wait_for_slot()
            wait = None
            with self._lock:
                self.stats["sent"] += 1
            try:
                r = self._send(session, body)  # the subclass's raw HTTP call, body read within the deadline
            except (requests.Timeout, _DeadlineExceeded, TimeoutError):
                reason = f"timeout: no complete answer within {self.cfg.timeout:g}s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    _TransportError, OSError) as e:
                # urllib3's IncompleteRead / ProtocolError: the connection broke mid-body
                reason = self.scrub(f"connection error: {type(e).__name__}")
            except requests.RequestException as e:
                return None, self.scrub(f"request error: {e}")
            else:
                if r.status_code == 200:
                    try:
                        text, tokens, problem = self._parse(r.json())
                    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                        reason = f"malformed response ({type(e).__name__}): {self.scrub(r.text[:200])!r}"
                    else:
                        if problem is None:
                            return text, tokens
                        kind, why = problem
                        with self._lock:
                            self.stats[kind] += 1
                        reason = f"{kind}: {why}"
                        if self.cfg.temperature <= 0:
                            return None, reason
                elif r.status_code == 429 or r.status_code >= 500 or r.status_code == 408:
                    wait = _retry_after_seconds(r.headers.get("retry-after"))
                    what = {429: "rate limited", 529: "overloaded"}.get(r.status_code, "")
                    reason = f"HTTP {r.status_code}{' ' + what if what else ''}: {self._server_message(r)}"
                elif r.status_code in (401, 403, 404):
                    hint = {401: f"check the key in ${self.key_env} (--api-key-env)",
                            403: f"the key in ${self.key_env} may lack access to this model",
                            404: "check --base-url and --model"}[r.status_code]
                    self._fatal = JudgeError(f"HTTP {r.status_code} from {self.endpoint}: "
                                             f"{self._server_message(r)} ({hint})")
                    self._stop.set()  # every other request would fail the same way
                    raise self._fatal
                else:  # 400, 413, 422 ...: this one request is bad; retrying will not help
                    return None, f"HTTP {r.status_code}: {self._server_message(r)}"
            if attempt == tries - 1:
                break
            delay = wait if wait is not None else self._backoff(attempt)
            if self._stop.wait(delay):
                raise _Stopped
        return None, f"{reason} (gave up after {tries} attempts)"

    def _work(self, key, system, user):
        text, extra = self._call(system, user)
        if text is None:
            return key, None, extra, 0
        rec = dict(key=key, api=self.cfg.api, model=self.model, text=text, tokens=extra,
                   time=round(time.time(), 3))
        with self._lock:
            self._store(key, rec)
            self.stats["tokens"] += extra
        return key, text, None, extra

    # --- the public entry point ------------------------------------------------------------------
    def complete(self, prompts, desc="judge"):
        """prompts: list of (system or None, user) -> list of Reply, in the same order."""
        keys = [self.request_key(s, u) for s, u in prompts]
        todo = {}
        for k, (s, u) in zip(keys, prompts):
            if k not in self._cache and k not in todo:
                todo[k] = (s, u)
        n_unique = len(set(keys))
        self.stats["cached"] += n_unique - len(todo)
        errors = {}
        bar = tqdm(total=n_unique, initial=n_unique - len(todo), desc=desc, unit="req",
                   disable=not self.cfg.progress, file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix(dict(self.stats))
        self._stop.clear()
        self._fatal = None
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        try:
            futures = [pool.submit(self._work, k, s, u) for k, (s, u) in todo.items()]
            for fut in as_completed(futures):
                try:
                    key, text, err, _ = fut.result()  # re-raises JudgeError
                except _Stopped:  # a worker saw the stop flag that a fatal error raised
                    raise (self._fatal or JudgeError("stopped")) from None
                if text is None:
                    errors[key] = err
                    self.stats["failed"] += 1
                bar.update(1)
                bar.set_postfix(dict(self.stats))
        except BaseException:
            # Ctrl-C or a fatal error: stop workers at their next attempt; what they already
            # paid for is in the cache, so a rerun resumes from there.
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
            pool.shutdown(wait=True)
        out = []
        f = open(self._cache_path, "rb") if self._cache_path is not None and keys else None
        try:
            for k in keys:
                if k in self._cache:
                    rec = self._record(self._cache[k], f)
                    out.append(Reply(rec["text"], None, k not in todo, int(rec.get("tokens", 0))))
                else:
                    out.append(Reply(None, errors.get(k, "not attempted")))
        finally:
            if f is not None:
                f.close()
        return out


# -----------------------------------------------------------------------------------------------
# The command line: the judge flags, the help format and the error handling shared by classify.py and
# curate.py, and the flags of `classify.py` itself


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: x)" only where a default says something (not for '', None, False)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, str) and not d):
            return action.help
        return super()._get_help_string(action)


def add_judge_args(p, api_choices=("openai", "anthropic"), default_api="openai",
                   temperature=0.0, max_tokens=512):
    """The judge flags, shared by classify.py and curate.py."""
    g = p.add_argument_group("judge (LLM over HTTP)")
    g.add_argument("--judge", choices=api_choices, default=default_api,
                   help="openai: any OpenAI-compatible /v1/chat/completions server (OpenAI, vLLM, "
                        "llama.cpp, Ollama); anthropic: Anthropic Messages API"
                        + ("; rules: offline regex counter, no server" if "rules" in api_choices
                           else ""))
    g.add_argument("--base-url", default="",
                   help="server address with or without /v1, e.g. http://localhost:8000; "
                        "empty = https://api.openai.com or https://api.anthropic.com")
    g.add_argument("--model", default="",
                   help="model name; empty = gpt-4o-mini for openai, claude-3-5-sonnet-20241022 "
                        "for anthropic (the paper's)")
    g.add_argument("--api-key-env", default="",
                   help="NAME of the environment variable that holds the API key; empty = "
                        "OPENAI_API_KEY or ANTHROPIC_API_KEY. If the variable is unset, requests "
                        "go without a key (fine for local servers). The key is never printed or "
                        "written.")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="max tokens per answer")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--rpm", type=float, default=0.0,
                   help="requests per minute, retries included; 0 = no limit")
    g.add_argument("--max-retries", type=int, default=6,
                   help="retries on 429 / 5xx / timeout / connection error (also mid-answer) / "
                        "malformed JSON before the item is reported failed; refusals and answers "
                        "cut at --max-tokens are retried only at a temperature above 0")
    g.add_argument("--backoff-base", type=float, default=1.0,
                   help="first backoff in seconds; doubles per retry, with jitter; a 429's "
                        "Retry-After wins")
    g.add_argument("--backoff-max", type=float, default=60.0,
                   help="longest backoff in seconds")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="deadline in seconds for one whole HTTP attempt (connect, wait and the "
                        "full answer); a late attempt is retried")
    g.add_argument("--cache", default="",
                   help="JSONL request cache; empty = judge_cache.jsonl in the output folder. "
                        "Reruns skip every cached request")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def judge_config_from_args(args, cache_default):
    return JudgeConfig(api=args.judge, base_url=args.base_url, model=args.model,
                       api_key_env=args.api_key_env, temperature=args.temperature,
                       max_tokens=args.max_tokens, concurrency=args.concurrency, rpm=args.rpm,
                       max_retries=args.max_retries, backoff_base=args.backoff_base,
                       backoff_max=args.backoff_max, timeout=args.timeout,
                       cache=args.cache or str(cache_default), progress=not args.no_progress)


def guard_run_config(path, cfg, overwrite=False):
    """A rerun into the same folder must use the same settings (it then resumes from the cache and
    rewrites identical results); otherwise refuse instead of silently mixing or replacing them."""
    path = Path(path)
    if path.exists() and not overwrite:
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(cfg)) if old.get(k) != cfg.get(k)]
        if diff:
            d = "; ".join(f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in diff)
            raise ValueError(f"{path.parent} holds results made with other settings ({d}). Use a "
                             "new --out, or --overwrite to replace them.")
    write_text_atomic(path, json.dumps(cfg, indent=2) + "\n")


def run_judged_command(command, args) -> int:
    """Run a CLI command that talks to a judge: a known error is one line and exit 2; Ctrl-C says
    how to resume (every finished request is already in the cache). curate.py uses it too."""
    try:
        return command(args)
    except (ValueError, FileNotFoundError, FileExistsError, JudgeError, FolderLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished requests are cached; rerun the same command to resume",
              file=sys.stderr)
        return 130


def build_label_parser():
    """The flags of `classify.py` (labelling completions): its own, then the judge's."""
    p = argparse.ArgumentParser(
        description="Count verification / backtracking / subgoal / backward-chaining in "
                    "Countdown completions with an LLM judge or offline rules.",
        formatter_class=HelpFormatter)
    p.add_argument("--input", help="completions JSONL, or a folder of them (runs/<name>/completions)"
                                   "; rows need nums, target, completion and optionally step")
    p.add_argument("--out", help="output folder (default: runs/<name>/labels next to a "
                                 "completions folder, or <input>_labels/)")
    p.add_argument("--n-samples", type=int, default=200,
                   help="completions judged per step, drawn without replacement; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-step sample")
    p.add_argument("--prompts-dir", default="",
                   help="folder with prompt files that replace the built-ins: countdown_<behavior>"
                        ".txt with {numbers} {target} {completion} placeholders")
    p.add_argument("--score-against", action="store_true",
                   help="compare the judge with ground-truth counts in the input rows' "
                        "\"behaviors\" (synthetic traces): precision/recall of count>0, and MAE")
    p.add_argument("--overwrite", action="store_true",
                   help="allow an --out folder made with other settings to be replaced")
    p.add_argument("--dump-prompts", default="", metavar="DIR",
                   help="write the built-in prompts as editable files into DIR and exit")
    add_judge_args(p, api_choices=("openai", "anthropic", "rules"), default_api="openai")
    return p


# -----------------------------------------------------------------------------------------------
# Prompt files: the built-in prompts replaced from --prompts-dir, or written out to be edited


# the placeholders of classify.py's prompts; other braces in a prompt are left as they are
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(numbers|nums|target|target//2|completion|response)\}")


def render_prompt(template, **fields):
    """Fill {numbers} {target} {target//2} {completion} {response}; leave other braces alone."""
    if "target" in fields:
        fields["target//2"] = int(fields["target"]) // 2
    if "numbers" in fields:
        fields.setdefault("nums", fields["numbers"])

    def sub(m):
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        name = m.group(1)
        return str(fields[name]) if name in fields else m.group(0)
    return _PLACEHOLDER.sub(sub, template)


def load_prompt_files(kind, builtin, names, required, prompts_dir=None):
    """-> ({behavior: template}, prompt_version): the builtin templates, each replaced by the first of its
    file names ({behavior: [names]}) found in prompts_dir; every file must hold the placeholder `required`."""
    prompts = dict(builtin)
    source = "builtin"
    if prompts_dir:
        d = Path(prompts_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--prompts-dir {d} is not a folder")
        found = []
        for b, files in names.items():
            for name in files:
                if (d / name).exists():
                    text = (d / name).read_text(encoding="utf-8")
                    if required not in text:
                        raise ValueError(f"prompt file {d / name} lacks the placeholder "
                                         f"{required} where the text to judge goes")
                    prompts[b] = text
                    found.append(name)
                    break
        if not found:
            want = ", ".join(n for files in names.values() for n in files)
            raise FileNotFoundError(f"no {kind} prompt files in {d}; expected some of: {want}")
        source = "custom"
        print(f"[prompts] {kind}: loaded {', '.join(found)} from {d}; built-in for the rest",
              file=sys.stderr)
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:10]
    return prompts, f"{kind}-{source}-{digest}"


def dump_prompt_files(out_dir, files) -> list:
    """Write {file name: text} into out_dir (refuses to overwrite any); -> the names, sorted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clash = [n for n in files if (out / n).exists()]
    if clash:
        raise FileExistsError(f"{out} already has {', '.join(clash)}; pick an empty folder")
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return sorted(files)

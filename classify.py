"""Count cognitive behaviors in reasoning text with an LLM judge (or transparent rules).

The paper measures four behaviors (verification, backtracking, subgoal setting, backward chaining)
in the completions of every PPO checkpoint: gpt-4o-mini reads each completion four times, once per
behavior, and answers with a count between <count> </count> tags. This file holds:

1. a small judge client over raw HTTP (`requests`, no SDKs) for any OpenAI-compatible
   /v1/chat/completions server (OpenAI, vLLM, llama.cpp, Ollama) and Anthropic's /v1/messages,
   with a thread pool, a requests-per-minute limit, retries with exponential backoff and jitter,
   a deadline per whole attempt, and a persistent JSONL cache so a rerun after a crash or Ctrl-C
   never pays twice; refusals and answers cut at max_tokens are failures with their reason,
   never cached answers;
2. the four behavior prompts for Countdown (paper section 4.2) and for math web text (4.3), in our
   own wording, overridable from files (--prompts-dir) so the originals can be dropped in;
3. count parsing, per-step aggregation (average counts, missing answers, accuracy) to CSV and JSON;
4. `--judge rules`: an offline rule-based counter whose rules are listed below (exact on
   countdown.py's synthetic traces, approximate on natural wording: biased across models),
5. `--score-against`: precision / recall / mean absolute error of any judge against ground truth,
6. `classify.py report`: PPO run folders gathered into results.json, a table and figures, and
7. `classify.py view`: one self-contained HTML page of sampled completions, each sentence tinted by
   its behavior, with the table, the figures and offline filters (report writes one too).

Simplifications and fixes relative to the original code (paper_spec D-E1..D-E7):
* synchronous requests with our own retries instead of the OpenAI Batch API (works with any server);
* temperature 0 by default (D-E2), sampling of N completions per step is seeded (D-E2, D-P8);
* `<count>\\s*(\\d+)\\s*</count>` tolerates whitespace, and an unparsable answer is *missing*, not 0,
  and is reported per step (D-E3); the four behaviors have one name each everywhere (D-E4);
* the judge sees the completion as the model wrote it, without an "Assistant:" prefix (D-E7);
* accuracy is reported both over every completion of a step and over the judged sample (D-E2).
"""

import argparse
import base64
import csv
import hashlib
import html
import io
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from tqdm import tqdm
from urllib3.exceptions import HTTPError as _TransportError  # requests' transport (a dependency)

import countdown
import traces

BEHAVIORS = traces.BEHAVIORS  # ("verification", "backtracking", "subgoal", "backward")

# -----------------------------------------------------------------------------------------------
# 1. The judge client


@dataclass
class JudgeConfig:
    api: str = "openai"          # "openai" (any /v1/chat/completions server) or "anthropic"
    base_url: str = ""           # "" = the API's public address; with or without a trailing /v1
    model: str = ""              # "" = the paper's model for this API (API_DEFAULTS)
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


# The paper's models: gpt-4o-mini judged Countdown completions, Claude 3.5 Sonnet wrote priming data.
API_DEFAULTS = {
    "openai": dict(base_url="https://api.openai.com", model="gpt-4o-mini",
                   api_key_env="OPENAI_API_KEY"),
    "anthropic": dict(base_url="https://api.anthropic.com", model="claude-3-5-sonnet-20241022",
                      api_key_env="ANTHROPIC_API_KEY"),
}
ANTHROPIC_VERSION = "2023-06-01"


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


class JudgeClient:
    """Send many (system, user) prompts; return one Reply per prompt, in order.

    Identical requests are sent once: the cache key is sha256 over (api, base url, model, system,
    messages, temperature, max_tokens). Each completed request is appended to the cache file
    (one flushed JSON line) by the worker thread that paid for it, so even a request that finishes
    while the run is being interrupted is kept; memory holds only {key: line offset}. Failed
    requests, refusals and answers cut at max_tokens are not cached: a rerun asks again.
    """

    def __init__(self, cfg: JudgeConfig):
        if cfg.api not in API_DEFAULTS:
            raise ValueError(f"unknown judge API {cfg.api!r}; choose one of {sorted(API_DEFAULTS)}")
        d = API_DEFAULTS[cfg.api]
        self.cfg = cfg
        self.base_url = normalize_base_url(cfg.base_url or d["base_url"])
        self.model = cfg.model or d["model"]
        self.key_env = cfg.api_key_env or d["api_key_env"]
        self._key = os.environ.get(self.key_env) or None
        path = "/v1/chat/completions" if cfg.api == "openai" else "/v1/messages"
        self.endpoint = self.base_url + path
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

    # --- HTTP ------------------------------------------------------------------------------------
    def _headers(self):
        h = {"content-type": "application/json"}
        if self.cfg.api == "anthropic":
            h["anthropic-version"] = ANTHROPIC_VERSION
            if self._key:
                h["x-api-key"] = self._key
        elif self._key:
            h["authorization"] = f"Bearer {self._key}"
        return h

    def _body(self, system, user):
        if self.cfg.api == "anthropic":
            body = dict(model=self.model, max_tokens=self.cfg.max_tokens,
                        temperature=self.cfg.temperature,
                        messages=[{"role": "user", "content": user}])
            if system:
                body["system"] = system
            return body
        msgs = ([{"role": "system", "content": system}] if system else [])
        msgs.append({"role": "user", "content": user})
        return dict(model=self.model, messages=msgs, temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens)

    def _parse(self, data):
        """(text, tokens, problem) from a 200 response; problem is None, or ("refused", why) or
        ("truncated", why) when the answer is a refusal or was cut at max_tokens: neither is an
        answer to keep. KeyError/TypeError/IndexError/AttributeError if the body is malformed."""
        limit = (f"hit max_tokens={self.cfg.max_tokens} (raise --max-tokens; a cut answer "
                 "is not kept)")
        if self.cfg.api == "anthropic":
            text = "".join(b["text"] for b in data["content"] if b.get("type") == "text")
            u = data.get("usage") or {}
            tokens = int(u.get("input_tokens", 0)) + int(u.get("output_tokens", 0))
            stop = data.get("stop_reason")
            if stop == "refusal":
                return None, tokens, ("refused", f"stop_reason refusal: {text[:200]!r}")
            if stop == "max_tokens":
                return None, tokens, ("truncated", f"stop_reason max_tokens: {limit}")
            return text, tokens, None
        choice = data["choices"][0]
        msg, finish = choice["message"], choice.get("finish_reason")
        u = data.get("usage") or {}
        tokens = int(u.get("total_tokens") or (u.get("prompt_tokens", 0)
                                               + u.get("completion_tokens", 0)))
        # a refusal comes as content null plus a "refusal" text, or as finish_reason
        # content_filter; both are the server's decision about this prompt, not an answer
        if msg.get("refusal") or finish == "content_filter":
            why = msg.get("refusal") or "finish_reason content_filter"
            return None, tokens, ("refused", self.scrub(str(why))[:200])
        text = msg["content"]
        if not isinstance(text, str):
            raise TypeError("message content is not a string")
        if finish == "length":
            return None, tokens, ("truncated", f"finish_reason length: {limit}")
        return text, tokens, None

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
            t0 = time.monotonic()
            try:
                r = session.post(self.endpoint, headers=self._headers(), json=body,
                                 timeout=self.cfg.timeout, stream=True)
                try:
                    read_body_within(r, t0 + self.cfg.timeout)
                finally:
                    r.close()
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


# -----------------------------------------------------------------------------------------------
# 2. Behavior prompts
#
# Countdown (paper section 4.2): the same frame for all four behaviors, then one instruction with
# the paper's criterion and the same kinds of examples, reworded. Placeholders: {numbers} (Python
# list repr), {target}, {completion}, {target//2}. Math web text (section 4.3): a markdown task
# with {response}. Rendering replaces only these names (and unescapes {{ }}), so the original
# prompt files - f-strings pasted into a file, or the str.format templates - load unchanged.

CLASSIFY_SYSTEM = "You are a careful assistant that analyzes mathematical reasoning."

_COUNTDOWN_FRAME = (
    "Below is a chain of reasoning that a language model wrote while playing the game Countdown "
    "with the numbers {numbers}. The goal is to reach the target number {target}.\n"
    "The model's chain of reasoning:\n<reasoning>\n{completion}\n</reasoning>\n\n")
_COUNT_ASK = ("Give the count between the tags <count> </count>. If there are none, answer "
              "<count>0</count>.")

COUNTDOWN_PROMPTS = {
    "verification": _COUNTDOWN_FRAME + (
        "Does the reasoning contain answer-verification steps? We mean places where the model "
        "explicitly checks a result it computed against the target number. Explicit checks look "
        "like 'That gives 1, which is not equal to 22' or 'Since 25 is not 22, ...'; implicit "
        "ones look like 'Too high!' or 'This works!'. Count every such check. " + _COUNT_ASK),
    "backtracking": _COUNTDOWN_FRAME + (
        "Does the reasoning contain backtracking, where the model realizes a path will not work "
        "and explicitly goes back to try a different approach? In this game, every new attempt "
        "with a combination of numbers that does not build on the result of the previous "
        "computation counts as backtracking. For example, with the numbers [6, 4, 9, 2] and the "
        "target 15, the reasoning \"6 + 4 = 10, 10 + 9 = 19. 9 - 6 = 3, 3 * 4 = 12, 12 + 2 = 14. "
        "9 * 2 = 18, 18 - 4 = 14. (9 + 6) * (4 / 2) = 30\" contains 3 instances of backtracking: "
        "each of the last three attempts starts again from the initial numbers instead of "
        "continuing from the previous result. Count the distinct backtracking instances. "
        + _COUNT_ASK),
    "subgoal": _COUNTDOWN_FRAME + (
        "Does the reasoning contain explicit subgoal setting, where the model breaks the problem "
        "into smaller intermediate goals? An example is \"First I'll try to get close to "
        "{target//2}, then ...\", or \"Let's reach 12 first, since it is a factor of 24\". "
        "Count the distinct subgoals that are set. " + _COUNT_ASK),
    "backward": _COUNTDOWN_FRAME + (
        "Does the reasoning contain backward chaining, where the model starts from the target "
        "number and works backwards towards the initial numbers? With the target 24 and the "
        "numbers 12 and 2, an example is \"Working back from the target: 24 / 2 = 12, so "
        "12 * 2 = 24.\"; with the target 22 and the numbers 25 and 3 it is \"The target is 22, "
        "and 22 + 3 = 25, so ...\". Count the distinct backward-chaining instances. "
        + _COUNT_ASK),
}


def _text_prompt(name, definition, examples, thoughts_hint, question, count_title):
    lines = "\n".join(f"- \"{e}\"" for e in examples)
    return (
        "# Task\nYou will read a piece of text taken from the internet. " + definition + "\n\n"
        f"In mathematical writing, {name} can look like:\n{lines}\n\n"
        f"Count the distinct instances of {name} and give the number between the tags "
        "<count> </count>. If there are none, answer <count>0</count>.\n\n"
        "# Answer format\nAnswer in markdown:\n\n"
        f"## Thoughts\n[{thoughts_hint}]\n\n## {question}\n[yes/no]\n\n"
        f"## {count_title}\n<count> N </count>\n\n"
        "# Text to evaluate\n{response}\n\n# Answer\n")


TEXT_PROMPTS = {
    "verification": _text_prompt(
        "verification",
        "Decide whether it contains verification steps: places where the writer explicitly "
        "checks their own work, for example by comparing a result with a known value or by "
        "re-checking a calculation.",
        ["Plugging x = 2 back into the original equation gives 4 + 4 = 8, as required.",
         "Differentiating our answer gives back the integrand, so the integral is right.",
         "Check a small case: for n = 2 the formula gives 3, and counting by hand also gives 3.",
         "Both roots satisfy the condition x > 0, so neither has to be discarded."],
        "where, briefly, the writer checks their work", "Does the text contain verification?",
        "Number of verification steps"),
    "backtracking": _text_prompt(
        "backtracking",
        "Decide whether it contains backtracking: places where the writer realizes a path will "
        "not work and explicitly goes back to try a different approach, such as \"let me try "
        "again\", \"wait\", \"I made a mistake\" or \"we need a different approach\". Mark the "
        "places where the writer abandons a line of thought and returns to an earlier point.",
        ["Substitution leads nowhere here; let's go back and integrate by parts instead.",
         "This gives 0 = 1, a contradiction, so the assumption was wrong. Back to the original "
         "equation.",
         "Oops, I dropped a sign in the second line. Redoing the computation from there:",
         "Expanding makes it worse; instead, let's factor the numerator."],
        "where, briefly, the writer backtracks", "Does the text contain backtracking?",
        "Number of backtracking steps"),
    "subgoal": _text_prompt(
        "subgoal setting",
        "Decide whether it contains explicit subgoal setting: places where the writer breaks "
        "the problem into smaller, intermediate goals.",
        ["First we find the derivative, and then we look for the points where it vanishes.",
         "To solve the system, we first express y in terms of x from the first equation, then "
         "substitute it into the second.",
         "The proof has three steps: the base case, the induction hypothesis, the inductive step.",
         "We simplify the integrand with a substitution first, and then apply the power rule."],
        "where, briefly, the writer sets subgoals", "Does the text contain subgoal setting?",
        "Number of subgoals"),
    "backward": _text_prompt(
        "backward chaining",
        "Decide whether it contains backward chaining: places where the writer works towards a "
        "goal by starting from the goal and reasoning backwards to what is given.",
        ["We want to show x = 4. Working backwards, x = 4 requires x^2 - 5x + 4 = 0, so let's "
         "check that this equation holds.",
         "We need a function whose derivative is 2x + 3; starting from that, x^2 + 3x + C works.",
         "For the triangle to be right-angled we need c^2 = a^2 + b^2, so let's see whether the "
         "side lengths satisfy it.",
         "The maximum is where f'(x) = 0, so we start from that condition and solve for x.",
         "The ball must reach 20 m; working back from that height with h = vt - gt^2/2 gives "
         "the initial speed v."],
        "where, briefly, the writer reasons backwards from a goal",
        "Does the text contain backward chaining?", "Number of backward-chaining instances"),
}

# Drop-in names: ours (countdown_<b>.txt, text_<b>.txt), and for math text the original repo's
# pretraining_analysis/prompts/*_v0.txt file names.
_PROMPT_FILES = {
    "countdown": {b: [f"countdown_{b}.txt"] for b in BEHAVIORS},
    "text": {"verification": ["text_verification.txt", "verification_v0.txt"],
             "backtracking": ["text_backtracking.txt", "backtracking_v0.txt"],
             "subgoal": ["text_subgoal.txt", "subgoal_setting_v0.txt"],
             "backward": ["text_backward.txt", "backward_chaining_v0.txt"]},
}
_REQUIRED_FIELD = {"countdown": "{completion}", "text": "{response}"}
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


def load_prompts(kind="countdown", prompts_dir=None):
    """-> ({behavior: template}, prompt_version). Files in prompts_dir override the built-ins."""
    if kind not in _PROMPT_FILES:
        raise ValueError(f"unknown prompt kind {kind!r}; choose countdown or text")
    prompts = dict(COUNTDOWN_PROMPTS if kind == "countdown" else TEXT_PROMPTS)
    source = "builtin"
    if prompts_dir:
        d = Path(prompts_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--prompts-dir {d} is not a folder")
        found = []
        for b, names in _PROMPT_FILES[kind].items():
            for name in names:
                if (d / name).exists():
                    text = (d / name).read_text(encoding="utf-8")
                    if _REQUIRED_FIELD[kind] not in text:
                        raise ValueError(f"prompt file {d / name} lacks the placeholder "
                                         f"{_REQUIRED_FIELD[kind]} where the text to judge goes")
                    prompts[b] = text
                    found.append(name)
                    break
        if not found:
            want = ", ".join(n for names in _PROMPT_FILES[kind].values() for n in names)
            raise FileNotFoundError(f"no {kind} prompt files in {d}; expected some of: {want}")
        source = "custom"
        print(f"[prompts] {kind}: loaded {', '.join(found)} from {d}; built-in for the rest",
              file=sys.stderr)
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:10]
    return prompts, f"{kind}-{source}-{digest}"


def dump_prompts(out_dir):
    """Write the built-in prompts as editable files (refuses to overwrite)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {f"countdown_{b}.txt": t for b, t in COUNTDOWN_PROMPTS.items()}
    files.update({f"text_{b}.txt": t for b, t in TEXT_PROMPTS.items()})
    clash = [n for n in files if (out / n).exists()]
    if clash:
        raise FileExistsError(f"{out} already has {', '.join(clash)}; pick an empty folder")
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return sorted(files)


# -----------------------------------------------------------------------------------------------
# 3. Counting with a judge

_COUNT_RE = re.compile(r"<count>\s*(\d+)\s*</count>")


def parse_count(text):
    """First <count> N </count> in the answer -> N; None (missing, not 0) when there is none."""
    if not text:
        return None
    m = _COUNT_RE.search(text)
    return int(m.group(1)) if m else None


def judge_behaviors(field_dicts, client, prompts, system=None, desc="judge"):
    """Ask the judge about every behavior of every item.

    field_dicts: one dict of placeholder values per item. Returns one dict per item:
    {"behaviors": {b: int | None}, "failed": {b: reason}, "missing": [b ...], "raw": {b: text}}.
    """
    reqs = [(system, render_prompt(prompts[b], **fields))
            for fields in field_dicts for b in BEHAVIORS]
    replies = client.complete(reqs, desc=desc)
    out = []
    for i in range(len(field_dicts)):
        rec = dict(behaviors={}, failed={}, missing=[], raw={})
        for j, b in enumerate(BEHAVIORS):
            r = replies[i * len(BEHAVIORS) + j]
            if r.text is None:
                rec["behaviors"][b] = None
                rec["failed"][b] = r.error
                continue
            rec["raw"][b] = r.text
            rec["behaviors"][b] = parse_count(r.text)
            if rec["behaviors"][b] is None:
                rec["missing"].append(b)
        out.append(rec)
    return out


# -----------------------------------------------------------------------------------------------
# 4. The rule-based judge: transparent regexes, no server.
#
# Scope, honestly: these rules are a cheap, offline, deterministic counter. They are exact on
# countdown.py's synthetic traces (every behavior there carries one of the marker phrases of
# traces.BEHAVIOR_PHRASES, which the patterns below include), and on hand-written natural
# Countdown reasoning they find most but not all instances (precision and recall per behavior on
# tests/behavior_snippets.jsonl are in the README). They read Countdown arithmetic, not general
# math text. Different models word the same behavior differently, so counts from the rules are
# biased when two models are compared: use an LLM judge for that (run_all.sh paper does).
#
# How a completion is counted. The text is cut into sentences (at . ! ? followed by a space, and
# at line breaks); a sentence counts at most once per behavior:
#   verification  a sentence with an explicit or implicit check of a result against the target
#                 ("is not 22", "too high", "one short", "that's it", "matches", "let me verify");
#   backtracking  a sentence that abandons a path ("scratch that", "let me reconsider", "back to
#                 the start"; "what about / how about / alternatively" only once an attempt has
#                 been made), OR, per the paper's judge prompt, a bare new attempt: an equation
#                 "a op b = c" whose two operands are both given numbers and reuses one that the
#                 current attempt already consumed (so it cannot continue that attempt), when no
#                 backtracking sentence announced it since the previous equation. Steps whose
#                 operands are neither given nor computed ("because 5 * 2 = 10") are not attempts;
#   subgoal       a sentence that sets an intermediate number to reach ("get 12 first", "aim for",
#                 "a stepping stone", "if I can make 12"); a number equal to the target is not a
#                 subgoal, and a plain plan ("First, multiply 6 by 2 to get 12") is not one;
#   backward      a sentence that reasons from the target ("work backwards", "the last step must
#                 be ... so I need", "to end at 35"), or an equation that starts from the target
#                 ("22 + 3 = 25", "35 = 5 * 7"), unless an earlier step already produced the target
#                 (then "25 * 4 = 100" continues forward from it).
# The equation-based and target-based parts need the problem's nums and target; without them
# only the phrase patterns run.

RULES_VERSION = "rules-v2"
_N = r"-?\d+(?:\.\d+)?"
RULES = {
    "verification": [
        rf"\b(?:is|was|are)\s*(?:not|n't)\s+(?:equal\s+to\s+|quite\s+)?(?:the\s+)?(?:target|goal|{_N})",
        rf"'s\s+not\s+(?:the\s+target|{_N})", rf"^\W*not\s+(?:the\s+target|{_N})\b",
        r"\bnot\s+equal\s+to\b", r"\bdoes\s*(?:not|n't)\s+(?:equal|match|reach)\b", r"≠|!=",
        r"\btoo\s+(?:high|low|big|small|large|much|little|many|few)\b",
        r"\b(?:over|under|short|off|out)\s+by\s+(?:\d+|one|two|three|a\s+(?:little|bit))\b",
        r"\b(?:one|two|three|\d+)\s+(?:short|too\s+many|too\s+few)\b",
        r"\b(?:more|less|fewer)\s+than\s+(?:we|I)\s+need", r"\bexceeds?\b",
        r"\b(?:more|less|bigger|smaller|larger|higher|lower|greater)\s+than\s+(?:the\s+target|"
        r"our\s+target|the\s+goal|needed|\d+)",
        r"\b(?:overshoot|overshot|undershoot|undershot)\b",
        r"\b(?:this|that|it)\s+works\b", r"\bmatch(?:es|ed)?\b",
        r"\b(?:equals?|reach(?:es|ed)?|hits?|match(?:es)?|gives(?:\s+us)?)\s+(?:the|our)\s+(?:target|goal)\b",
        r"\b(?:which|that|it)\s+is\s+(?:exactly\s+)?(?:the\s+|our\s+)?(?:target|goal)\b",
        r"\b(?:hits?|reach(?:es)?|gives?|makes?)\s+\d+\s+exactly\b",
        r"\b(?:exactly\s+)?what\s+(?:we|I)\s+(?:want|need)(?:ed)?\b",
        r"\b(?:that'?s|this\s+is|it'?s)\s+(?:it|the\s+target|our\s+(?:target|number|goal))\b",
        r"\bour\s+number\b", r"\bas\s+(?:required|needed|desired)\b",
        r"\bgoal\s+(?:has\s+been|is)\s+reached\b", r"\bverif(?:y|ies|ied|ying|ication)\b",
        r"\b(?:let'?s|let\s+me|I'?ll|we)\s+check\s+(?:if|whether|that|it|this|the\s+(?:result|"
        r"answer|math|arithmetic|sum|product))\b", r"\bcheck(?:ing)?\s*:",
        r"\bdouble[- ]check", r"\bmake\s+sure\b", r"\bis\s+indeed\b", r"✓|✔",
        r"\bgo(?:ing)?\s+back\s+(?:over|through)\b", r"\ball\s+(?:the\s+)?steps\s+are\s+(?:right|correct)",
        r"\b\d+\s+is\s+(?:very\s+|quite\s+)?close\s+to\s+(?:the\s+)?(?:target|goal|\d+)",
        r"\bmiss(?:es|ed)?\s+the\s+(?:target|goal)\b", r"\bbingo\b", r"\bperfect\b", r"\bgot\s+it\b",
        r"^\W*(?:correct|right|yes|yep|nope|no|no\s+good|close|still\s+no)\b",
    ],
    "backtracking": [
        r"\b(?:let'?s|let\s+me|I'?ll|we'?ll|I\s+will|we\s+should|I\s+should)\s+try\s+"
        r"(?:a\s+|an\s+)?(?:different|another|other|something|again|new)\b",
        r"\btry(?:ing)?\s+(?:something\s+else|another|a\s+different|a\s+new|again)\b",
        r"\b(?:start|starting)\s+(?:over|again|fresh)\b", r"\bgo(?:ing)?\s+back\b(?!\s+(?:over|through))",
        r"\bback\s+to\s+(?:the\s+)?(?:start|beginning|drawing\s+board|original|initial)",
        r"\bback\s*track", r"\b(?:does|did|will|would)\s*(?:not|n't)\s+work\b", r"\bwon'?t\s+work\b",
        r"\bdead\s+end\b", r"\bno\s+luck\b", r"\b(?:that|this)\s+fails\b",
        r"\b(?:scrap|scratch)\s+(?:that|this)\b", r"\bsomething\s+else\b",
        r"\b(?:try|use|do)\b[^.!?]{0,40}\binstead\b(?!\s+of)", r"\breconsider\b",
        r"\bthink\s+again\b", r"\bwrong\s+(?:way|path|direction|track|approach)\b", r"\bdifferently\b",
        r"\bredo\b", r"\bchange\s+of\s+plan\b", r"\bundo\s+the\s+last\b",
        r"\banother\s+(?:approach|way(?!\s+to\s+(?:write|say|express|put))|combination|option|"
        r"sequence|pair|idea|attempt|possibility)\b",
        r"\bdifferent\s+(?:approach|combination|sequence|way|order)\b",
    ],
    "subgoal": [
        r"\bsub-?goals?\b", r"\bintermediate\s+(?:goal|target|value|result|step)\b",
        r"\baim(?:ing)?\s+(?:for|at)\s+\d+", r"\bget(?:ting)?\s+close\s+to\s+\d+",
        r"\b(?:try|trying|aim|want|need|going)\s+(?:to\s+)?(?:reach|get\s+to|get|make|obtain)\s+"
        r"\d+\s*(?:first|since|because|as|,\s*(?:since|because|as|which))",
        r"\bto\s+reach\s+\d+\s+(?:since|because|as)\b",
        r"\b(?:reach|get\s+to|get|make|hit|obtain|build)\s+(?:a\s+number\s+)?(?:near|close\s+to|"
        r"around)\s+\d+", r"\bstepping[- ]stone", r"\bbreak\s+(?:this|it|the\s+problem)\s+(?:down|into)\b",
        r"\b(?:target|goal)\s+for\s+the\s+(?:first|second|other|left|right)\b",
        r"\b(?:a\s+)?(?:factor|multiple|divisor)\s+of\s+the\s+target\b",
    ],
    "backward": [
        r"\bwork(?:ing|s|ed)?\s+back(?:wards?)?\b", r"\bbackwards?\s+from\b",
        r"\bfrom\s+the\s+(?:target|goal|end)\b", r"\bin\s+reverse\b",
        rf"\bsince\s+the\s+target\s+is\s+{_N}",
        r"\bto\s+(?:get|reach|make)\s+(?:the\s+target\s+)?\d+\s*,?\s*(?:I|we)\s+"
        r"(?:would\s+)?(?:need|could|can)\b",
        r"\b(?:the\s+)?target\s+\d+\s+(?:is|=|equals)\s+\d+\s*[-+*/x×]\s*\d+",
        r"\blast\s+(?:step|operation)\s+(?:must|has\s+to|should|would|will|is|could)\b",
        r"\bto\s+(?:finish|end)\s+(?:up\s+)?(?:at|with|on)\s+\d+", r"\bundo(?:ing)?\s+(?:the\s+)?operations\b",
    ],
}
# Patterns that name a number: the number must not be the target (reaching the target is the task,
# not a subgoal). Used only when the target is known.
_SUBGOAL_NUMBER = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(?:reach|get\s+to|get|make|hit|obtain|build)\s+(?:a\s+)?(\d+)\s+first\b",
    r"\bfirst\s+(?:try\s+to\s+)?(?:reach|get\s+to|hit|make|obtain)\s+(?:a\s+)?(\d+)",
    r"\b(?:want|like|try(?:ing)?|aim(?:ing)?|plan)\s+to\s+(?:reach|get\s+to|get|make|hit|obtain|"
    r"build)\s+(?:a\s+)?(\d+)\b",
    r"\bif\s+(?:I|we)\s+can\s+(?:make|get|reach|build|obtain)\s+(?:a\s+)?(\d+)",
)]
# "12, a factor of 24": a number chosen for its relation to the target (the paper's example)
_FACTOR_OF = re.compile(r"\b(?:factor|multiple|divisor)\s+of\s+(\d+)", re.IGNORECASE)
# a re-computation inside a check ("Let me verify: 6 * 7 = 42") is not a new attempt
_RECHECK = re.compile(r"\bverif|\bdouble[- ]check|\bcheck(?:ing)?\s*:|\bmake\s+sure\b|\bindeed\b|"
                      r"\bgo(?:ing)?\s+back\s+(?:over|through)\b|✓|✔", re.IGNORECASE)
# "What about / how about / alternatively": a new attempt only once there was an attempt, and only
# if no backtracking sentence already announced it.
_SOFT_RESTART = re.compile(r"^\W*(?:what|how)\s+about\b|\bwhat\s+if\b|\balternatively\b",
                           re.IGNORECASE)
_RULES_RE = {b: [re.compile(p, re.IGNORECASE) for p in pats] for b, pats in RULES.items()}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
# one arithmetic step, symbolic ("12 * 4 = 48", not inside a longer expression) or in words
_OP = r"[-+*/×x÷]"
_STEP_RE = [re.compile(p, re.IGNORECASE) for p in (
    rf"(?<![\d.)(*/+×÷-])(?<![\d.)(*/+×÷-]\s)(\d+)\s*({_OP})\s*(\d+)\s*(?:=|gives|is|makes)\s*(-?\d+)",
    rf"(?<![\d.)(*/+×÷-])(?<![\d.)(*/+×÷-]\s)(\d+)\s*({_OP})\s*(\d+)\s*\?\s*that\s+gives\s+(-?\d+)",
    r"(\d+)\s+(plus|minus|times|divided\s+by)\s+(\d+)\s+(?:is|gives|equals|makes)\s+(-?\d+)",
    r"(adding|multiplying|dividing)\s+(\d+)\s+(?:and|by)\s+(\d+)\s+gives\s+(-?\d+)",
    r"(subtracting)\s+(\d+)\s+from\s+(\d+)\s+leaves\s+(-?\d+)",
)]
# an equation that starts from the target: "T op n = m" or "T = a op b"; and the target as the
# result of a step ("= T", "gives T", "That is T"), after which "T op n" continues forward
_FROM_TARGET = r"(?<![\d.)(*/+×÷-])(?<![\d.)(*/+×÷-]\s){t}\s*(?:{op}\s*\d+\s*=|=\s*\d+\s*{op}\s*\d+)"
_AS_RESULT = r"(?:=|\bgives(?:\s+us)?|\bleaves|\bis|\bmakes|\bequals)\s*{t}\b(?!\s*(?:{op}|\.\d))"


def _steps(sentence):
    """[(operands, result, start)] of the arithmetic steps in a sentence, in order."""
    out = []
    for k, rx in enumerate(_STEP_RE):
        for m in rx.finditer(sentence):
            g = m.groups()
            if k == 3 or k == 4:          # words first: "adding 6 and 4", "subtracting 4 from 6"
                a, b = g[1], g[2]
            else:
                a, b = g[0], g[2]
            out.append(((int(a), int(b)), int(g[3]), m.start()))
    return sorted(out, key=lambda s: s[2])


def count_behaviors_rules(text, nums=None, target=None):
    """{behavior: number of sentences that show it}, by the rules above. nums and target (the
    problem) enable bare-restart backtracking and the target-aware subgoal/backward rules."""
    counts = dict.fromkeys(BEHAVIORS, 0)
    for _, hit in behavior_sentences(text, nums, target):
        for b in BEHAVIORS:
            counts[b] += hit[b]
    return counts


def behavior_sentences(text, nums=None, target=None) -> list:
    """[(sentence, {behavior: shown?})] in order: the rules' view of each sentence of text."""
    out = []
    given = {}
    for n in nums or ():
        given[int(n)] = given.get(int(n), 0) + 1
    t = None if target is None else int(target)
    from_target = as_result = None
    if t is not None and t not in given:
        from_target = re.compile(_FROM_TARGET.format(t=t, op=_OP))
        as_result = re.compile(_AS_RESULT.format(t=t, op=_OP), re.IGNORECASE)
    used, avail = {}, {}        # the current attempt: given numbers consumed, results available
    seen_step = announced = reached = False  # reached: a step has produced the target
    for sentence in _SENTENCE_SPLIT.split(text or ""):
        hit = {b: any(r.search(sentence) for r in _RULES_RE[b]) for b in BEHAVIORS}
        if not hit["backtracking"] and seen_step and not announced and _SOFT_RESTART.search(sentence):
            hit["backtracking"] = True
        if t is not None and not hit["subgoal"]:
            hit["subgoal"] = (any(int(m.group(1)) != t for r in _SUBGOAL_NUMBER
                                  for m in r.finditer(sentence))
                              or any(int(m.group(1)) == t for m in _FACTOR_OF.finditer(sentence)))
        if from_target is not None and not hit["backward"] and not reached:
            hit["backward"] = bool(from_target.search(sentence))
        if as_result is not None and any(
                not re.search(r"(?:target|goal)\W*\w*\W*$", sentence[:m.start()], re.IGNORECASE)
                for m in as_result.finditer(sentence)):
            reached = True  # "That gives 25." ("the target is 25" restates the task)
        if hit["backtracking"]:
            announced, used, avail = True, {}, {}   # the text says a new attempt starts
        steps = _steps(sentence)
        # Bare restarts: only with the given numbers known, never inside a re-check ("let me
        # verify: 6 * 7 = 42" recomputes), a step from the target, or a plan's reason ("reach 5
        # first, since 5 * 5 = 25" states a subgoal, not a step of an attempt).
        if given and not _RECHECK.search(sentence) and not hit["backward"] and not hit["subgoal"]:
            for (a, b), c, _ in steps:
                if not all(avail.get(x, 0) > 0 or x in given for x in (a, b)):
                    continue  # a justification ("because 5 * 2 = 10"), not a step of an attempt
                reached = reached or c == t
                fresh = all(avail.get(x, 0) == 0 and x in given for x in (a, b))
                reused = any(used.get(x, 0) >= given[x] for x in (a, b) if x in given)
                if fresh and reused:
                    if seen_step and not announced:
                        hit["backtracking"] = True
                    used, avail = {}, {}
                for x in (a, b):
                    if avail.get(x, 0) > 0:
                        avail[x] -= 1
                    elif x in given:
                        used[x] = used.get(x, 0) + 1
                avail[c] = avail.get(c, 0) + 1
                seen_step, announced = True, False
        out.append((sentence, hit))
    return out


# -----------------------------------------------------------------------------------------------
# 5. Completions in, per-step labels and summaries out


def write_text_atomic(path, text):
    """Write a text file via a temp file and os.replace (JSONL goes through countdown.write_jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_csv(path, rows):
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def load_completions(path, torn_fix=""):
    """Rows from a JSONL file or a folder of them (e.g. runs/x/completions/step_10.jsonl); invalid UTF-8
    reads as U+FFFD, and a cut last line is skipped with a warning or, given torn_fix, an error saying it.

    Each row needs the problem (nums or numbers, target) and the completion (completion,
    response or generated). "step" comes from the row, else from a step_<N> file name, else 0.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"--input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in {p}")
    rows = []
    for f in files:
        m = re.search(r"step_?(\d+)", f.stem)
        for i, r in enumerate(countdown.read_jsonl(f, errors="replace", torn_fix=torn_fix)):
            r = dict(r)
            if "nums" not in r and "numbers" in r:
                r["nums"] = r.pop("numbers")
            for alt in ("response", "generated"):
                if "completion" not in r and alt in r:
                    r["completion"] = r.pop(alt)
            missing = [k for k in ("nums", "target", "completion") if k not in r]
            if missing:
                raise ValueError(f"{f} line {i + 1} lacks {', '.join(missing)}; each row needs "
                                 "nums, target and completion (the text after the prompt)")
            r.setdefault("step", int(m.group(1)) if m else 0)
            rows.append(r)
    return rows


def sample_per_step(rows, n_samples, seed=0):
    """{step: (all rows, judged rows)}: n_samples per step without replacement, seeded per step."""
    by_step = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(r)
    out = {}
    for step in sorted(by_step):
        group = by_step[step]
        if n_samples and len(group) > n_samples:
            idx = sorted(random.Random(f"{seed}:{step}").sample(range(len(group)), n_samples))
            out[step] = (group, [group[i] for i in idx])
        else:
            out[step] = (group, list(group))
    return out


def label_completions(rows, judge="rules", prompts=None, prompt_version=RULES_VERSION):
    """Label rows with behavior counts. judge: "rules" or a JudgeClient.

    Returns the rows with "behaviors" (int, or None when missing/failed), "judge", and when
    relevant "failed" {behavior: reason}, "missing" [behaviors] and the judge's raw answers. A
    row's own ground-truth "behaviors" (synthetic traces) is kept as "true_behaviors".
    """
    if judge == "rules":
        results = [dict(behaviors=count_behaviors_rules(r["completion"], r.get("nums"),
                                                         r.get("target")), failed={}, missing=[],
                        raw={}) for r in rows]
        meta = dict(model="rules", prompt_version=RULES_VERSION)
    else:
        fields = [dict(numbers=list(r["nums"]), target=r["target"],
                       completion=str(r["completion"]).strip()) for r in rows]
        results = judge_behaviors(fields, judge, prompts, system=CLASSIFY_SYSTEM,
                                  desc="classify")
        meta = dict(model=judge.model, prompt_version=prompt_version, api=judge.cfg.api,
                    temperature=judge.cfg.temperature)
    out = []
    for r, res in zip(rows, results):
        row = {k: v for k, v in r.items() if k != "behaviors"}
        if isinstance(r.get("behaviors"), dict):
            row["true_behaviors"] = r["behaviors"]
        row["behaviors"] = res["behaviors"]
        row["judge"] = meta
        if res["failed"]:
            row["failed"] = res["failed"]
        if res["missing"]:
            row["missing"] = res["missing"]
        if res["raw"]:
            row["judge_text"] = res["raw"]
        out.append(row)
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize_step(step, all_rows, labelled):
    """One summary row: accuracy and length over every completion, accuracy over the judged
    sample, and per behavior the average count over parsed answers, the fraction > 0, and how
    many are missing (answer without a count) or failed (no answer)."""
    acc = [countdown.is_correct(r["completion"], r["nums"], r["target"]) for r in all_rows]
    acc_j = [countdown.is_correct(r["completion"], r["nums"], r["target"]) for r in labelled]
    s = dict(step=step, n_completions=len(all_rows), n_judged=len(labelled),
             accuracy=_mean(acc), accuracy_judged=_mean(acc_j),
             mean_chars=_mean([len(str(r["completion"])) for r in all_rows]),
             # tokens, when the sampler recorded them (ppo.py's "length"); the paper's CSVs
             # report a length that looks token-based (D-E5)
             mean_tokens=_mean([r["length"] for r in all_rows]) if all(
                 "length" in r for r in all_rows) else None)
    for b in BEHAVIORS:
        counts = [r["behaviors"][b] for r in labelled if r["behaviors"][b] is not None]
        s[f"{b}_avg"] = _mean(counts)
        s[f"{b}_frac"] = _mean([c > 0 for c in counts])
        s[f"{b}_missing"] = sum(b in r.get("missing", []) for r in labelled)
        s[f"{b}_failed"] = sum(b in r.get("failed", {}) for r in labelled)
    return s


def score_against(rows, truth_key="true_behaviors"):
    """Per behavior, on items where both the truth and the judge's count exist:
    precision / recall of "count > 0", and the mean absolute error of the counts."""
    out = {}
    for b in BEHAVIORS:
        pairs = [(r[truth_key][b], r["behaviors"][b]) for r in rows
                 if r.get(truth_key) and r[truth_key].get(b) is not None
                 and r["behaviors"].get(b) is not None]
        tp = sum(t > 0 and p > 0 for t, p in pairs)
        fp = sum(t == 0 and p > 0 for t, p in pairs)
        fn = sum(t > 0 and p == 0 for t, p in pairs)
        out[b] = dict(n=len(pairs), tp=tp, fp=fp, fn=fn, tn=len(pairs) - tp - fp - fn,
                      precision=tp / (tp + fp) if tp + fp else None,
                      recall=tp / (tp + fn) if tp + fn else None,
                      mae=_mean([abs(t - p) for t, p in pairs]))
    return out


def _fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def format_score_table(scores):
    lines = [f"{'behavior':<13} {'n':>5} {'precision':>9} {'recall':>7} {'MAE':>6}"]
    for b, s in scores.items():
        lines.append(f"{b:<13} {s['n']:>5} {_fmt(s['precision']):>9} {_fmt(s['recall']):>7} "
                     f"{_fmt(s['mae']):>6}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# 6. CLI

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


def run(args):
    if args.dump_prompts:
        names = dump_prompts(args.dump_prompts)
        print(f"wrote {len(names)} prompt files to {args.dump_prompts}")
        return 0
    if not args.input:
        raise ValueError("--input is required (a completions JSONL file or a folder of them)")
    inp = Path(args.input)
    if args.out:
        out = Path(args.out)
    elif inp.is_dir():
        out = inp.parent / "labels"
    else:
        out = inp.with_name(inp.stem + "_labels")
    with countdown.lock_dir(out, "classify.py output folder"):  # one live writer per folder and judge cache
        return _label_into(args, inp, out)


def _label_into(args, inp, out):
    rows = load_completions(inp)
    if args.judge == "rules":
        prompts, version = None, RULES_VERSION
    else:
        prompts, version = load_prompts("countdown", args.prompts_dir)
    cfg = dict(input=str(inp.resolve()), judge=args.judge, base_url=None, model=None,
               temperature=None, max_tokens=None, n_samples=args.n_samples, seed=args.seed,
               prompt_version=version)
    if args.judge != "rules":
        d = API_DEFAULTS[args.judge]
        cfg.update(base_url=normalize_base_url(args.base_url or d["base_url"]),
                   model=args.model or d["model"], temperature=args.temperature,
                   max_tokens=args.max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    guard_run_config(out / "config.json", cfg, args.overwrite)

    groups = sample_per_step(rows, args.n_samples, args.seed)
    judged = [r for step in groups for r in groups[step][1]]
    print(f"{len(rows)} completions in {len(groups)} step(s); judging {len(judged)} "
          f"with {args.judge} -> {out}", file=sys.stderr)
    if args.judge == "rules":
        judge = "rules"
    else:
        judge = JudgeClient(judge_config_from_args(args, out / "judge_cache.jsonl"))
    labelled = label_completions(judged, judge, prompts, version)

    summary, i = [], 0
    for step, (all_rows, sample) in groups.items():
        summary.append(summarize_step(step, all_rows, labelled[i:i + len(sample)]))
        i += len(sample)
    countdown.write_jsonl(out / "labels.jsonl", labelled)
    write_text_atomic(out / "summary.json", json.dumps(
        dict(judge=labelled[0]["judge"] if labelled else None, steps=summary), indent=2) + "\n")
    _write_csv(out / "summary.csv", summary)

    print(f"{'step':>6} {'n':>5} {'acc':>6} " + " ".join(f"{b[:6]:>7}" for b in BEHAVIORS)
          + "  missing/failed")
    for s in summary:
        print(f"{s['step']:>6} {s['n_judged']:>5} {_fmt(s['accuracy']):>6} "
              + " ".join(f"{_fmt(s[f'{b}_avg'], 2):>7}" for b in BEHAVIORS) + "  "
              + " ".join(f"{s[f'{b}_missing']}/{s[f'{b}_failed']}" for b in BEHAVIORS))
    n_failed = sum(1 for r in labelled if r.get("failed"))
    n_missing = sum(1 for r in labelled if r.get("missing"))
    if n_failed or n_missing:
        print(f"{n_failed} item(s) with failed requests, {n_missing} with an answer lacking "
              f"<count>; their counts are null (not 0). Rerun the same command to retry failures.",
              file=sys.stderr)
        for r in [r for r in labelled if r.get("failed")][:5]:
            print(f"  step {r['step']} nums {r['nums']} target {r['target']}: {r['failed']}",
                  file=sys.stderr)
    print(f"wrote {out / 'labels.jsonl'}, {out / 'summary.csv'}, {out / 'summary.json'}")

    if args.score_against:
        truth = [r for r in labelled if r.get("true_behaviors")]
        if not truth:
            raise ValueError("--score-against needs ground-truth counts: input rows with a "
                             "\"behaviors\" dict, as traces.generate_traces writes")
        report = dict(overall=score_against(truth))
        conds = sorted({r["condition"] for r in truth if "condition" in r})
        if len(conds) > 1:
            report["by_condition"] = {c: score_against([r for r in truth if r.get("condition") == c])
                                      for c in conds}
        print(f"\nagainst ground truth ({len(truth)} items; positive = count > 0):")
        print(format_score_table(report["overall"]))
        for c, sc in report.get("by_condition", {}).items():
            print(f"\n[{c}]\n" + format_score_table(sc))
        write_text_atomic(out / "score.json", json.dumps(report, indent=2) + "\n")
    return 0


# -----------------------------------------------------------------------------------------------
# 6. The study report: PPO run folders in, results.json and figures out
#
# The paper's Figures 1 and 4 plot, per condition, validation accuracy against the PPO step, and
# Figure 5 the behavior counts of the validation completions. `classify.py report` rebuilds them
# from run folders (runs/<mode>/ppo/<condition>_s<seed>/, or any ppo.py --out): accuracy, response
# length and arithmetic from completions/step_<N>.jsonl, behaviors from labels/labels.jsonl when
# classify.py has labelled the run (any judge), else counted with the rules. Accuracy intervals are
# Wilson 95% intervals over the problems (and seeds, pooled), the binomial noise of a test set.


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n (None when n == 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _run_name(folder: Path):
    """(condition, seed) from a folder named <condition>_s<seed>; else (folder name, 0)."""
    m = re.fullmatch(r"(.+)_s(\d+)", folder.name)
    return (m.group(1), int(m.group(2))) if m else (folder.name, 0)


def summarize_run(folder) -> dict:
    """Per validation step of one PPO run: n, correct, accuracy, mean behavior counts, mean
    response length in tokens, and the fraction of stated arithmetic steps that are right."""
    folder = Path(folder)
    rows = load_completions(folder / "completions") if (folder / "completions").is_dir() else []
    if not rows:
        raise ValueError(f"{folder}: no completions/step_<N>.jsonl; is it a ppo.py run folder with "
                         "at least one validation?")
    labels = {k: r["behaviors"] for k, r in _labels_of(folder).items()}  # a judge's counts win over the rules
    steps = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r)
    truncated = {}
    if (folder / "metrics.jsonl").exists():  # the share of validation responses cut at --max-response
        for m in countdown.read_jsonl(folder / "metrics.jsonl"):
            if m.get("val_truncated_frac") is not None:
                truncated[m["step"]] = m["val_truncated_frac"]
    out = dict(steps=[], n_eval=[], correct=[], accuracy=[], response_length=[], arithmetic_accuracy=[],
               truncated=[], answer_rate=[], numbers_exact=[], checks_consistent=[],
               behaviors={b: [] for b in BEHAVIORS},
               judge="rules" if not labels else "labels/labels.jsonl")
    for step in sorted(steps):
        rs = steps[step]
        correct = sum(countdown.is_correct(r["completion"], r["nums"], r["target"]) for r in rs)
        right = stated = 0
        for r in rs:
            a, s = traces.check_arithmetic(r["completion"])
            right, stated = right + a, stated + s
        counts = [labels.get((step, json.dumps(r["nums"]), r["target"], r["completion"]))
                  or count_behaviors_rules(r["completion"], r["nums"], r["target"]) for r in rs]
        out["steps"].append(step)
        out["n_eval"].append(len(rs))
        out["correct"].append(correct)
        out["accuracy"].append(correct / len(rs))
        out["response_length"].append(_mean([r.get("length", len(r["completion"].split())) for r in rs]))
        out["arithmetic_accuracy"].append(right / stated if stated else None)
        out["truncated"].append(truncated.get(step))
        answered = [r for r in rs if countdown.score(r["completion"], r["nums"], r["target"]) > 0]
        out["answer_rate"].append(len(answered) / len(rs))
        out["numbers_exact"].append(_mean([countdown.uses_given_numbers(r["completion"], r["nums"]) for r in answered])
                                    if answered else None)
        good, checks = map(sum, zip(*[traces.read_checks(r["completion"], r["target"]) for r in rs]))
        out["checks_consistent"].append(good / checks if checks else None)
        for b in BEHAVIORS:
            out["behaviors"][b].append(_mean([c[b] for c in counts if c.get(b) is not None]))
    return out


def study_results(run_folders) -> dict:
    """{"conditions": {name: {"final_accuracy", "n_eval", "initial_accuracy", intervals,
    "seeds": {seed: summarize_run(...)}}}} over PPO run folders named <condition>_s<seed>."""
    conds: dict = {}
    for folder in sorted(Path(f) for f in run_folders):
        name, seed = _run_name(folder)
        conds.setdefault(name, {"seeds": {}})["seeds"][str(seed)] = summarize_run(folder)
    for c in conds.values():
        runs = list(c["seeds"].values())
        last = min(len(r["steps"]) for r in runs) - 1  # the last step every seed reached
        for key, i in (("initial", 0), ("final", last)):
            k, n = sum(r["correct"][i] for r in runs), sum(r["n_eval"][i] for r in runs)
            c[f"{key}_accuracy"], c[f"{key}_ci95"] = k / n, wilson_interval(k, n)
            c[f"{key}_step"] = runs[0]["steps"][i]
            c[f"{key}_behaviors"] = {b: _mean([r["behaviors"][b][i] for r in runs]) for b in BEHAVIORS}
            c[f"{key}_arithmetic_accuracy"] = _mean([r["arithmetic_accuracy"][i] for r in runs
                                                     if r["arithmetic_accuracy"][i] is not None])
        c["n_eval"], c["n_seeds"] = runs[0]["n_eval"][last], len(runs)
        c["best_accuracy"] = max(_mean([r["accuracy"][i] for r in runs]) for i in range(last + 1))
    return {"conditions": conds}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_figures(results, out_dir) -> list:
    """accuracy.png, behaviors.png and response_length.png like the paper's Figures 4, 5 and the
    length panel; returns the paths written ([] with a message when matplotlib is missing)."""
    plt = _pyplot()
    if plt is None:
        print("figures skipped: matplotlib is not installed (pip install matplotlib); "
              "results.json is written all the same", file=sys.stderr)
        return []
    out_dir, paths = Path(out_dir), []
    conds = results["conditions"]
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(conds)}

    def lines(ax, get):
        for c, v in conds.items():
            for k, (seed, r) in enumerate(sorted(v["seeds"].items())):
                ys = get(r)
                ax.plot(r["steps"], [y if y is not None else float("nan") for y in ys], color=colors[c],
                        alpha=0.9 if k == 0 else 0.5, ls="-" if k == 0 else "--",
                        label=c if k == 0 else None)

    panels = [("accuracy.png", "validation accuracy (T = 1)", [lambda r: r["accuracy"]], [""]),
              ("response_length.png", "response length (tokens)", [lambda r: r["response_length"]], [""]),
              ("truncated.png", "validation responses cut at the cap",
               [lambda r: r.get("truncated") or [None] * len(r["steps"])], [""]),
              ("behaviors.png", "behavior count per completion",
               [lambda r, b=b: r["behaviors"][b] for b in BEHAVIORS], list(BEHAVIORS))]
    for name, ylabel, getters, titles in panels:
        fig, axes = plt.subplots(1, len(getters), figsize=(4.2 * len(getters), 3.4), squeeze=False)
        for ax, get, title in zip(axes[0], getters, titles):
            lines(ax, get)
            ax.set_xlabel("PPO step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle("solid: first seed, dashed: other seeds", fontsize=8)
        fig.tight_layout()
        tmp = out_dir / f".{name}.{os.getpid()}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, out_dir / name)
        paths.append(str(out_dir / name))
    return paths


def format_results_table(results) -> str:
    """A markdown table: per condition and seed, step-0 and final accuracy with 95% intervals."""
    def acc(k, n):
        lo, hi = wilson_interval(k, n)
        return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["| condition | seed | n | step 0 accuracy [95% CI] | final step | final accuracy [95% CI] | "
             "verif | backtr | subgoal | backward | arith. steps right |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, v in results["conditions"].items():
        for seed, r in sorted(v["seeds"].items()):
            i = len(r["steps"]) - 1
            b = " | ".join(f"{r['behaviors'][x][i]:.2f}" for x in BEHAVIORS)
            ar = r["arithmetic_accuracy"][i]
            lines.append(f"| {c} | {seed} | {r['n_eval'][i]} | {acc(r['correct'][0], r['n_eval'][0])} | "
                         f"{r['steps'][i]} | {acc(r['correct'][i], r['n_eval'][i])} | {b} | "
                         f"{'-' if ar is None else f'{ar:.3f}'} |")
        if len(v["seeds"]) > 1:
            lo, hi = v["final_ci95"]
            lines.append(f"| {c} | pooled | {v['n_eval']}x{v['n_seeds']} | {v['initial_accuracy']:.3f} | "
                         f"{v['final_step']} | {v['final_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | | | | | |")
    return "\n".join(lines)


# Gates before RL (README, "The miniature study"): what must hold at step 0 for RL to have something
# to amplify. A failed gate is reported as failed; nothing is hidden or stopped.
GATES = (("base arithmetic on held-out drill facts", 0.98), ("step-0 accuracy >= best control's", None),
         ("completions that end with an answer", 0.95), ("checks consistent with the value computed", 0.95),
         ("answers that use exactly the given numbers", 0.90))


def is_control(condition: str) -> bool:
    """The behavior-free controls: empty reasoning or dots (either design's names)."""
    return condition.endswith("empty_cot") or condition.endswith("dots")


def study_gates(results, gates_dir=None) -> list:
    """[{"gate", "condition", "measured", "threshold", "passed"}] from step 0 of the runs (pooled
    over seeds) and gates_dir/base_arithmetic.json (sft.py eval --arithmetic), when given."""
    conds, rows = results["conditions"], []
    base = Path(gates_dir) / "base_arithmetic.json" if gates_dir else None
    if base is not None and base.exists():
        a = json.loads(base.read_text())["arithmetic_accuracy"]
        rows.append(dict(gate=GATES[0][0], condition="base", measured=a, threshold=GATES[0][1],
                         passed=a >= GATES[0][1]))
    controls = [c for c in conds if is_control(c)]
    best = max((conds[c]["initial_accuracy"] for c in controls), default=None)
    for c, v in conds.items():
        if is_control(c):
            continue
        if best is not None:
            rows.append(dict(gate=GATES[1][0], condition=c, measured=v["initial_accuracy"], threshold=best,
                             passed=v["initial_accuracy"] >= best))
        for (gate, threshold), key in zip(GATES[2:], ("answer_rate", "checks_consistent", "numbers_exact")):
            got = [r[key][0] for r in v["seeds"].values() if r.get(key) and r[key][0] is not None]
            if got:
                m = _mean(got)
                rows.append(dict(gate=gate, condition=c, measured=m, threshold=threshold, passed=m >= threshold))
    return rows


def greedy_results(greedy_dir) -> dict:
    """{condition: {"seeds": {seed: summary}, "accuracy", "n", "ci95"}} from greedy_dir/<condition>_s<seed>.json
    (sft.py eval summaries of each run's final policy), pooled over seeds."""
    out: dict = {}
    for f in sorted(Path(greedy_dir).glob("*.json")):
        try:
            summary = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{f}: not a JSON summary of sft.py eval; delete it and rerun the study") from None
        name, seed = _run_name(Path(f.stem))
        summary["correct"] = round(summary["accuracy"] * summary["n"])
        out.setdefault(name, {"seeds": {}})["seeds"][str(seed)] = summary
    for v in out.values():
        k, n = sum(s["correct"] for s in v["seeds"].values()), sum(s["n"] for s in v["seeds"].values())
        v.update(accuracy=k / n if n else None, n=n, correct=k, ci95=wilson_interval(k, n))
    return out


def format_gates_table(gates) -> str:
    lines = ["| gate | condition | measured | threshold | passed |", "|---|---|---|---|---|"]
    for g in gates:
        lines.append(f"| {g['gate']} | {g['condition']} | {g['measured']:.3f} | {g['threshold']:.3f} | "
                     f"{'yes' if g['passed'] else '**FAILED**'} |")
    return "\n".join(lines)


def format_greedy_table(greedy) -> str:
    lines = ["| condition | seeds | n | greedy accuracy [95% CI] |", "|---|---|---|---|"]
    for c, v in greedy.items():
        lo, hi = v["ci95"]
        lines.append(f"| {c} | {', '.join(sorted(v['seeds']))} | {v['n']} | {v['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(lines)


def report(args) -> int:
    folders = [Path(p) for p in args.runs]
    missing = [str(p) for p in folders if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a run folder: {', '.join(missing)}; pass ppo.py --out folders")
    results = study_results(folders)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = draw_figures(results, out)
    results["gates"] = study_gates(results, args.gates)
    results["greedy"] = greedy_results(args.greedy) if args.greedy and Path(args.greedy).is_dir() else {}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    table = format_results_table(results)
    if results["gates"]:
        table = "## Gates before RL\n\n" + format_gates_table(results["gates"]) + "\n\n## PPO, T = 1\n\n" + table
    if results["greedy"]:
        table += "\n\n## Final policies, greedy, fresh problems\n\n" + format_greedy_table(results["greedy"])
    write_text_atomic(out / "results.md", table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in results["figures"]))
    if not args.no_view:
        try:   # the page is an extra: a run it cannot show (no metrics.jsonl...) leaves the results as they are
            write_view(out / "view.html", build_view(folders, results=results, figures=results["figures"]))
            print(f"wrote {out / 'view.html'}")
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"view.html not written: {e}", file=sys.stderr)
    return 0


# -----------------------------------------------------------------------------------------------
# 7. The study page: what the models wrote, behaviors highlighted
#
# `classify.py view RUN... --out view.html` (and `report`, beside results.md) writes one HTML file that
# opens offline: the results table, the figures as data: URIs, and per run and validation step a seeded
# sample of completions, each sentence tinted by the rules' labels (behavior_sentences). An LLM judge
# counts whole completions, not sentences: where labels/labels.jsonl exists its counts are shown beside
# the tints and drive the behavior filter, as they drive the report. Model text is untrusted: every string
# is escaped, control characters are shown as symbols, and a Content-Security-Policy lets only our own
# script (by its hash) run and nothing load. The size is bounded: at most VIEW_MAX_CARDS completions, each
# card at most VIEW_CARD_BYTES (long texts are cut, with a marker), figures at most VIEW_FIGURE_BYTES.

VIEW_MAX_CARDS = 600            # 10 runs x 3 steps x 20 completions
VIEW_CARD_BYTES = 6000          # 600 cards + 3 figures stay under 5 MB
VIEW_MAX_CHARS = 2500           # characters of one completion shown before the byte check
VIEW_LABEL_CHARS = 20_000       # characters of one completion the rules tint
VIEW_FIGURE_BYTES = 600_000     # all PNGs together, before base64 (x 4/3)
_VIEW_MARK = "<!-- written by classify.py view -->"
_TINT = {"verification": "#9fd3ff", "backtracking": "#ffb0b0", "subgoal": "#b5e3a0", "backward": "#dcb8ff"}
_ABBR = {"verification": "verif", "backtracking": "backtr", "subgoal": "subgoal", "backward": "backward"}
_UNSHOWN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # all but \t \n; lone surrogates
_COMPLETIONS_FIX = ("it was not written to the end; resume the run with the same ppo.py command, or delete "
                    "the file to leave that step out")
_VIEW_SCRIPT = """const f=document.getElementById('filters');f.hidden=false;
f.onchange=()=>{const v=k=>f.elements[k].value;let n=0;
for(const c of document.querySelectorAll('#grid .card')){const d=c.dataset,b=v('behavior'),
ok=(!v('cond')||d.cond==v('cond'))&&(!v('step')||d.step==v('step'))&&(!v('correct')||d.correct==v('correct'))
&&(!b||(b=='none'?d.behaviors=='':d.behaviors.split(' ').includes(b)));c.hidden=!ok;n+=ok}
for(const g of document.querySelectorAll('#grid section'))g.hidden=!g.querySelector('.card:not([hidden])');
document.getElementById('shown').textContent=n+' shown';};
for(const[k,v]of new URLSearchParams(location.hash.slice(1)))if(f.elements[k])f.elements[k].value=v;f.onchange();"""
_VIEW_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1em auto;max-width:1250px;padding:0 1em}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 5px}
figure{display:inline-block;margin:4px}img{max-width:100%;max-height:230px}.note{background:#fff6d5;padding:4px 8px}
.card{border:1px solid #bbb;border-radius:4px;margin:6px 0;padding:4px 8px}.card.ok{border-left:5px solid #2a2}
.card.bad{border-left:5px solid #c33}.meta{margin:2px 0;font-size:12px;color:#333}
.text{white-space:pre-wrap;overflow-wrap:anywhere;font:12px/1.5 ui-monospace,monospace}
.s{border-radius:3px}sup{font-size:9px;color:#444}.cut{background:#eee;font-weight:bold}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}.chip{padding:1px 6px;border-radius:3px}
[hidden]{display:none!important}"""


def _shown(x) -> str:
    """x as escaped HTML text: control characters become visible symbols (U+2400...), never markup."""
    def sym(m):
        c = ord(m.group())
        return chr(0x2400 + c) if c < 0x20 else "\u2421" if c == 0x7F else "\ufffd"
    return html.escape(_UNSHOWN.sub(sym, str(x)), quote=True)


def _correct(row) -> bool:
    """ppo.py's own judgment of a validation row where it wrote one, else the reward's."""
    return bool(row["correct"]) if "correct" in row else countdown.is_correct(str(row["completion"]), row["nums"],
                                                                                row["target"])


def _tinted(pieces, limit):
    """(HTML of [(gap, sentence, labels)], characters cut): a span per labelled sentence, cut at limit."""
    out, used, total = [], 0, sum(len(g) + len(s) for g, s, _ in pieces)
    for gap, sentence, labels in pieces:
        if used + len(gap) + len(sentence) > limit:
            keep = max(0, limit - used - len(gap))
            gap, sentence = gap[:limit - used], sentence[:keep]
        out.append(_shown(gap))
        used += len(gap) + len(sentence)
        if sentence and labels:
            stops = ",".join(f"{_TINT[b]} {100 * i // len(labels)}% {100 * (i + 1) // len(labels)}%"
                             for i, b in enumerate(labels))
            out.append(f'<span class="s" style="background:linear-gradient({stops})" title="{", ".join(labels)}">'
                       f'{_shown(sentence)}<sup>{"+".join(_ABBR[b] for b in labels)}</sup></span>')
        else:
            out.append(_shown(sentence))
        if used >= limit:
            break
    return "".join(out), total - used


def _view_card(row, run):
    """One completion as an <article>, at most VIEW_CARD_BYTES: the problem, the tinted text, the answer,
    score, correct or not, length; data-* attributes for the filters. Returns (html, characters cut)."""
    text, nums, target = str(row["completion"]), row["nums"], row["target"]
    # The rules read sentence by sentence, so a prefix labels its whole sentences as the full text does
    # (its last one may be cut: that one is left untinted); a 100 KB completion then costs ~0.2 s, not 1 s.
    long = len(text) > VIEW_LABEL_CHARS
    sentences = behavior_sentences(text[:VIEW_LABEL_CHARS], nums, target)[:-1 if long else None]
    pieces, pos = [], 0
    for sentence, hit in sentences:
        start = text.find(sentence, pos)  # the split drops only the separators between sentences
        pieces.append((text[pos:start], sentence, [b for b in BEHAVIORS if hit[b]]))
        pos = start + len(sentence)
    pieces.append((text[pos:], "", []))
    label = run["labels"].get((row["step"], json.dumps(row["nums"]), row["target"], row["completion"]))
    counts = (label["behaviors"] if label else count_behaviors_rules(text, nums, target) if long
              else {b: sum(b in ls for _, _, ls in pieces) for b in BEHAVIORS})
    judge = (label.get("judge") or {}).get("model", "judge") if label else "rules"
    correct = _correct(row)
    score = row["score"] if "score" in row else countdown.score(text, nums, target)
    answer = countdown._last_answer(text)
    length = f"{row['length']} tokens, " if "length" in row else ""
    attrs = dict(run=run["name"], cond=run["cond"], step=row["step"], correct=int(correct),
                 behaviors=" ".join(b for b in BEHAVIORS if (counts.get(b) or 0) > 0))
    head = (f'<article class="card {"ok" if correct else "bad"}" '
            + " ".join(f'data-{k}="{_shown(v)}"' for k, v in attrs.items()) + ">\n"
            f'<p class="meta"><b>{_shown(nums)} &rarr; {_shown(target)}</b> · {_shown(run["name"])} · step '
            f'{_shown(row["step"])} · <b>{"correct" if correct else "wrong"}</b> · score {_shown(score)} · '
            f'{_shown(length)}{len(text):,} chars</p>\n<p class="meta">answer: <code>'
            + ("(none)" if answer is None else _shown(answer.strip()[:120]) + ("…" if len(answer) > 122 else ""))
            + f"</code> · counts ({_shown(judge)}): "
            + ", ".join(f"{_ABBR[b]} {_shown(counts.get(b))}" for b in BEHAVIORS) + "</p>\n")
    limit = VIEW_MAX_CHARS
    while True:
        body, cut = _tinted(pieces, limit)
        card = (head + f'<div class="text">{body}'
                + (f'<span class="cut"> ✂ {cut:,} more characters not shown</span>' if cut else "")
                + "</div></article>\n")
        size = len(card.encode("utf-8"))
        if size <= VIEW_CARD_BYTES or limit == 0:
            return card, cut
        limit = int(limit * VIEW_CARD_BYTES / size * 0.9)


def _labels_of(folder) -> dict:
    """{(step, nums as JSON, target, completion): label row} from a judge's labels/labels.jsonl, if any."""
    path = Path(folder) / "labels" / "labels.jsonl"
    rows = countdown.read_jsonl(path, errors="replace") if path.exists() else []
    return {(r["step"], json.dumps(r["nums"]), r["target"], r["completion"]): r for r in rows}


def _view_folders(paths) -> list:
    """Run folders from RUN arguments: a ppo.py run folder, or a study folder holding them (one or two
    levels down, as run_all.sh's runs/<mode>/ppo/<name>/)."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such folder; pass ppo.py --out run folders or a study folder "
                                    "holding them")
        if (p / "completions").is_dir() or (p / "metrics.jsonl").exists():
            out.append(p)
        else:
            found = {c.parent for pat in ("*/completions", "*/*/completions") for c in p.glob(pat)}
            out.extend(sorted(found) or [p])
    return sorted(set(out))


def _view_run(folder) -> dict:
    """One ppo.py run folder, checked: its completions per validation step, judge labels and progress."""
    folder = Path(folder)
    if not (folder / "metrics.jsonl").is_file():
        raise ValueError(f"{folder}: no metrics.jsonl, so it is not a ppo.py run folder or its run stopped "
                         "before the first step; pass ppo.py --out folders (or a study folder holding them), "
                         "or resume that run with the same ppo.py command")
    files = {int(f.stem[5:]): f for f in (folder / "completions").glob("step_*.jsonl") if f.stem[5:].isdigit()}
    if not files:
        raise ValueError(f"{folder}: no completions/step_<N>.jsonl; ppo.py writes one per validation, so "
                         "wait for the first validation or pass another run")
    metrics = countdown.read_jsonl(folder / "metrics.jsonl", errors="replace", torn_fix=(
        "the run was interrupted mid-write; resume it with the same ppo.py command, or delete that line"))
    try:
        cfg = json.loads((folder / "config.json").read_text(errors="replace"))
    except (OSError, ValueError):
        cfg = {}
    name, seed = _run_name(folder)
    steps = {s: load_completions(files[s], torn_fix=_COMPLETIONS_FIX) for s in sorted(files)}
    return dict(folder=folder, name=folder.name, cond=name, seed=seed, steps=steps, labels=_labels_of(folder),
                trained=max((r.get("step") or 0 for r in metrics), default=0), planned=cfg.get("steps"))


def _md_table(md) -> str:
    """The report's markdown table as an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.strip() and not set(line) <= set("|-: ")]
    return "<table>" + "".join("<tr>" + "".join(f"<{t}>{_shown(c)}</{t}>" for c in r) + "</tr>"
                               for t, r in zip(["th"] + ["td"] * len(rows), rows)) + "</table>"


def build_view(folders, per_step=5, seed=0, steps=(), compare="", results=None, figures=None) -> str:
    """The HTML page for ppo.py run folders (see this section's comment); results and figures (PNG
    paths) as report made them, else computed and drawn here."""
    if per_step < 1:
        raise ValueError(f"--per-step must be >= 1, got {per_step}")
    runs = [_view_run(f) for f in folders]
    missing = sorted(set(steps) - {s for r in runs for s in r["steps"]})
    if missing:
        have = sorted({s for r in runs for s in r["steps"]})
        raise ValueError(f"--steps {' '.join(map(str, missing))}: no run validated there; their steps: "
                         f"{', '.join(map(str, have))}")
    if compare and compare not in [r["name"] for r in runs]:
        raise ValueError(f"--compare {compare}: no such run; choose one of {', '.join(r['name'] for r in runs)}")
    if results is None:
        results = study_results(folders)
    notes = []
    if figures is None:
        with tempfile.TemporaryDirectory() as tmp:
            figures = [(Path(p).name, Path(p).read_bytes()) for p in draw_figures(results, tmp)]
    else:
        figures = [(Path(p).name, Path(p).read_bytes() if Path(p).is_file() else b"") for p in figures]
    groups = [(r, s) for r in runs for s in sorted({min(r["steps"]), max(r["steps"])} | set(steps) & set(r["steps"]))]
    asked = sum(min(per_step, len(r["steps"][s])) for r, s in groups)
    n_each = min(per_step, max(1, VIEW_MAX_CARDS // len(groups)))
    if len(groups) > VIEW_MAX_CARDS:
        groups = [groups[i] for i in sorted(random.Random(seed).sample(range(len(groups)), VIEW_MAX_CARDS))]
    cards, n_cut, shown = [], 0, 0
    picked = {}
    for r, s in groups:
        rows = r["steps"][s]
        # one seed per run, not per step: the same problems (same places in the test set) at every step
        idx = sorted(random.Random(f"{seed}:{r['name']}").sample(range(len(rows)), min(n_each, len(rows))))
        picked[(r["name"], s)] = [rows[i] for i in idx]
        n_ok = sum(map(_correct, rows))
        cards.append(f'<section><h3>{_shown(r["name"])} · step {s} <small>({n_ok} of {len(rows)} correct; '
                     f"{len(idx)} shown)</small></h3>\n")
        for i in idx:
            card, cut = _view_card(rows[i], r)
            cards.append(card)
            n_cut, shown = n_cut + bool(cut), shown + 1
        cards.append("</section>\n")
    if shown < asked:
        notes.append(f"Sampled: {asked:,} completions asked for, {shown:,} shown (at most {VIEW_MAX_CARDS} "
                     "per page, to keep it under 5 MB).")
    # side by side: the same problems at the first and the last validation step of one run
    run = next(r for r in runs if r["name"] == (compare or runs[0]["name"]))
    first, last = min(run["steps"]), max(run["steps"])
    pairs = []
    for a in picked.get((run["name"], first), [])[:3] if last != first else []:
        b = next((x for x in run["steps"][last] if (x["nums"], x["target"]) == (a["nums"], a["target"])), None)
        if b is not None:
            (ca, xa), (cb, xb) = _view_card(a, run), _view_card(b, run)
            pairs.append(f'<div class="pair">{ca}{cb}</div>\n')
            n_cut += bool(xa) + bool(xb)
    if n_cut:
        notes.append(f"{n_cut} completion(s) cut (marked ✂) to keep each under {VIEW_CARD_BYTES:,} bytes of HTML.")
    figs, budget = [], VIEW_FIGURE_BYTES
    for name, data in figures:
        if 0 < len(data) <= budget:
            budget -= len(data)
            figs.append(f'<figure><img alt="{_shown(name)}" src="data:image/png;base64,'
                        f'{base64.b64encode(data).decode()}"><figcaption>{_shown(name)}</figcaption></figure>')
        else:
            notes.append(f"Figure {name} left out (missing, or past {VIEW_FIGURE_BYTES:,} bytes of figures).")
    if not figures:
        notes.append("No figures: matplotlib is not installed (pip install matplotlib).")
    legend = " ".join(f'<span class="chip" style="background:{_TINT[b]}">{b} <sup>{_ABBR[b]}</sup></span>'
                      for b in BEHAVIORS)

    def option(v, t):
        return f'<option value="{_shown(v)}">{_shown(t)}</option>'
    conds = sorted({r["cond"] for r in runs})
    all_steps = sorted({s for _, s in groups})
    form = (f'<form id="filters" hidden>Show: <select name="cond">{option("", "every condition")}'
            + "".join(option(c, c) for c in conds) + f'</select> <select name="step">{option("", "every step")}'
            + "".join(option(s, f"step {s}") for s in all_steps)
            + f'</select> <select name="correct">{option("", "correct and wrong")}{option(1, "correct")}'
            f'{option(0, "wrong")}</select> <select name="behavior">{option("", "any behaviors")}'
            + "".join(option(b, f"with {b}") for b in BEHAVIORS) + option("none", "with none")
            + '</select> <span id="shown"></span></form>')
    runs_list = "".join(
        f"<li>{_shown(r['name'])}: trained to step {_shown(r['trained'])}"
        + (f" of {_shown(r['planned'])}" if r["planned"] else "")
        + f"; validated at steps {_shown(', '.join(map(str, sorted(r['steps']))))}; behavior counts from "
        + ("labels/labels.jsonl (a judge)" if r["labels"] else "the rules") + "</li>" for r in runs)
    script_hash = base64.b64encode(hashlib.sha256(_VIEW_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    return "".join([
        f'<!DOCTYPE html>\n{_VIEW_MARK}\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        f"<title>What the models wrote</title><style>{_VIEW_CSS}</style></head><body>\n"
        f"<h1>What the models wrote</h1>\n<p>{len(runs)} run(s); {n_each} completion(s) per run and step, "
        f"seed {seed}. Written by <code>classify.py view</code>; it loads nothing from the network.</p>\n",
        "".join(f'<p class="note">{_shown(n)}</p>\n' for n in notes),
        f"<h2>Results</h2>\n{_md_table(format_results_table(results))}\n{''.join(figs)}\n<ul>{runs_list}</ul>\n",
        f"<h2>Legend</h2>\n<p>{legend}</p>\n<p>Tints: the rules' label of each sentence (<code>behavior_sentences"
        f"</code>, {RULES_VERSION}); a sentence with two labels shows both colours and both tags. Counts and "
        "the behavior filter: a judge's labels/labels.jsonl where the run has one, else the rules.</p>\n",
        f"<h2>Step {first} and step {last}, same problems: {_shown(run['name'])}</h2>\n"
        + ("".join(pairs) or "<p>(one validation step only, or no problem in both)</p>\n"),
        f"<h2>Completions</h2>\n{form}\n<div id=\"grid\">\n{''.join(cards)}</div>\n",
        f"<script>{_VIEW_SCRIPT}</script>\n</body></html>\n"])


def write_view(out, page, force=False):
    """Write the page atomically; an existing file that this command did not write is kept unless force."""
    out = Path(out)
    if out.exists() and not force:
        with open(out, encoding="utf-8", errors="replace") as f:
            if _VIEW_MARK not in f.read(200):
                raise FileExistsError(f"{out} exists and was not written by classify.py view; choose another "
                                      "--out or pass --force to replace it")
    write_text_atomic(out, page)


def view(args) -> int:
    folders = _view_folders(args.runs)
    page = build_view(folders, args.per_step, args.seed, args.steps, args.compare)
    write_view(args.out, page, args.force)
    print(f"wrote {args.out} ({len(page.encode()) / 1e6:.2f} MB, {len(folders)} run(s))")
    return 0


def build_view_parser():
    p = argparse.ArgumentParser(
        prog="classify.py view",
        description="One self-contained HTML page of what the models wrote: results, figures, and a seeded "
                    "sample of completions per run and validation step with each sentence tinted by its "
                    "behavior, filters that work offline.",
        epilog="example: python classify.py view runs/mini --out runs/mini/view.html --steps 50",
        formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="ppo.py run folders, or a study folder holding them")
    p.add_argument("--out", default="view.html", help="the HTML file to write")
    p.add_argument("--per-step", type=int, default=5, help="completions shown per run and validation step")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (the same problems at every step)")
    p.add_argument("--steps", type=int, nargs="*", default=[],
                   help="validation steps to show besides each run's first and last")
    p.add_argument("--compare", default="", help="run (folder name) whose first and last step are shown "
                                                 "side by side (default: the first run)")
    p.add_argument("--force", action="store_true", help="replace an --out file this command did not write")
    p.epilog += "; open view.html#correct=0&behavior=backtracking to start with those filters set"
    return p


def build_report_parser():
    p = argparse.ArgumentParser(
        prog="classify.py report",
        description="Gather PPO run folders into results.json, a markdown table and figures "
                    "(accuracy, behaviors and response length against the PPO step).",
        epilog="example: python classify.py report runs/mini/ppo/*_s* --out runs/mini",
        formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="ppo.py run folders; a name <condition>_s<seed> groups seeds")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the PNG figures")
    p.add_argument("--gates", default=None, metavar="DIR",
                   help="folder with base_arithmetic.json (sft.py eval --arithmetic) for the gates table")
    p.add_argument("--greedy", default=None, metavar="DIR",
                   help="folder of <condition>_s<seed>.json (sft.py eval of each final policy): a greedy table")
    p.add_argument("--no-view", action="store_true", help="skip view.html (see classify.py view -h)")
    return p


def build_parser():
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


def run_judged_command(command, args) -> int:
    """Run a CLI command that talks to a judge: a known error is one line and exit 2; Ctrl-C says
    how to resume (every finished request is already in the cache). curate.py uses it too."""
    try:
        return command(args)
    except (ValueError, FileNotFoundError, FileExistsError, JudgeError, countdown.FolderLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished requests are cached; rerun the same command to resume",
              file=sys.stderr)
        return 130


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return run_judged_command(report, build_report_parser().parse_args(argv[1:]))
    if argv[:1] == ["view"]:
        return run_judged_command(view, build_view_parser().parse_args(argv[1:]))
    return run_judged_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

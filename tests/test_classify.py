"""classify.py: the judge client against a local fake server (both API shapes, injected faults,
kill-and-resume, secrets), count parsing, per-step aggregation, and the rule-based judge."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import classify
import traces
from conftest import ROOT   # conftest put ROOT on sys.path; pytest puts tests/ there
from fake_judge import FakeJudge, client_flags
from plumbing import files, report as study_report

KEY = "sk-FAKE-0123456789-do-not-leak"
FAST = client_flags(timeout=1.5, max_retries=3)


def behavior_of(prompt):
    """Which behavior a built-in Countdown prompt asks about (its instruction follows the frame)."""
    tail = prompt.split("</reasoning>", 1)[1]
    for b in classify.BEHAVIORS:
        instruction = classify.COUNTDOWN_PROMPTS[b].split("</reasoning>", 1)[1][:60]
        if instruction in tail:
            return b
    raise AssertionError("unknown prompt")


def item_of(prompt):
    return int(prompt.split("<<ITEM-", 1)[1].split(">>", 1)[0])


def true_count(item, b):
    return (item + classify.BEHAVIORS.index(b)) % 3


def expected(item, b):
    return None if (item == 5 and b == "subgoal") else true_count(item, b)


def responder(prompt, system):
    """Answers like a judge: count = (item + behavior index) % 3, in varied tag spacing."""
    i, b = item_of(prompt), behavior_of(prompt)
    if i == 5 and b == "subgoal":
        return "I think there are two subgoals, but I forgot the tag."
    return f"## Thoughts\n...\n<count>{' ' * (i % 2)}{true_count(i, b)}{chr(10) * (i % 2)}</count>"


def make_rows(n_items, steps=(0,)):
    rows = []
    for step in steps:
        for i in range(n_items):
            k = i + 100 * step
            rows.append(dict(step=step, nums=[3, 5, 2], target=16, prompt="p",
                             completion=f" <<ITEM-{k}>> 3 + 5 = 8. 8 * 2 = 16 </think>\n"
                                        f"<answer>{'(3 + 5) * 2' if i % 2 == 0 else '3 + 5 + 2'}"
                                        "</answer>", score=0.0, length=20 + i))
    return rows


def write_completions(folder, rows):
    for step in sorted({r["step"] for r in rows}):
        files.write_jsonl(Path(folder) / f"step_{step}.jsonl", [r for r in rows if r["step"] == step])


def all_output_text(folder):
    return "".join(p.read_text(errors="replace") for p in Path(folder).rglob("*") if p.is_file())


# --- parsing and prompts -------------------------------------------------------------------------

def test_parse_count_tolerates_whitespace_and_reports_missing():
    assert classify.parse_count("<count>3</count>") == 3
    assert classify.parse_count("so <count> 12 </count>") == 12
    assert classify.parse_count("<count>\n4\n</count> and later <count>9</count>") == 4  # first
    assert classify.parse_count("<count>0</count>") == 0
    # no digits (the original templates' placeholder), no tag, empty: missing, not 0
    assert classify.parse_count("<count> [1/2/...] </count>") is None
    assert classify.parse_count("there are 3") is None
    assert classify.parse_count("") is None and classify.parse_count(None) is None


def test_prompts_render_and_original_files_drop_in(tmp_path):
    p = classify.render_prompt(classify.COUNTDOWN_PROMPTS["subgoal"], numbers=[3, 5, 2], target=25,
                               completion="a {weird} {target} text")
    assert "[3, 5, 2]" in p and "reach the target number 25" in p
    assert "close to 12," in p                       # {target//2}
    assert "a {weird} {target} text" in p            # values are not re-rendered
    for b in classify.BEHAVIORS:
        assert "<count>" in classify.COUNTDOWN_PROMPTS[b] and "{completion}" in classify.COUNTDOWN_PROMPTS[b]
        assert "{response}" in classify.TEXT_PROMPTS[b]
    # the original Countdown prompts are f-strings: pasted into a file they keep {numbers} etc.
    (tmp_path / "countdown_backward.txt").write_text(
        "Numbers {numbers}, target {target}: {completion}. Half is {target//2}. <count> </count>")
    # the original math-text prompts are str.format templates named *_v0.txt
    (tmp_path / "backtracking_v0.txt").write_text("# Task\n{{literal}}\n{response}\n# Response\n")
    cd, v1 = classify.load_prompts("countdown", tmp_path)
    assert cd["backward"].startswith("Numbers {numbers}")
    assert cd["verification"] == classify.COUNTDOWN_PROMPTS["verification"]
    assert classify.render_prompt(cd["backward"], numbers=[1, 2], target=9, completion="x") == \
        "Numbers [1, 2], target 9: x. Half is 4. <count> </count>"
    tx, v2 = classify.load_prompts("text", tmp_path)
    assert classify.render_prompt(tx["backtracking"], response="DOC") == "# Task\n{literal}\nDOC\n# Response\n"
    assert v1 != classify.load_prompts("countdown")[1] and "custom" in v1 and "custom" in v2
    (tmp_path / "countdown_subgoal.txt").write_text("no placeholder here")
    with pytest.raises(ValueError, match="completion"):
        classify.load_prompts("countdown", tmp_path)
    with pytest.raises(FileNotFoundError):
        classify.load_prompts("text", tmp_path / "nope")
    names = classify.dump_prompts(tmp_path / "dump")
    assert len(names) == 8
    with pytest.raises(FileExistsError):
        classify.dump_prompts(tmp_path / "dump")


def test_base_url_normalization():
    n = classify.normalize_base_url
    assert n("http://h:8000") == n("http://h:8000/") == n("http://h:8000/v1") == n("http://h:8000/v1/") \
        == "http://h:8000"
    with pytest.raises(ValueError):
        n("localhost:8000")


# --- the client, both API shapes -----------------------------------------------------------------

@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_client_speaks_both_apis(api, suffix, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_KEY", KEY)
    with FakeJudge(lambda p, s: f"echo {len(p)} <count>1</count>", api_key=KEY) as fj:
        cfg = classify.JudgeConfig(api=api, base_url=fj.url + suffix, model="m-test",
                                   api_key_env="FAKE_KEY", temperature=0.0, max_tokens=77,
                                   cache=str(tmp_path / "c.jsonl"), progress=False)
        client = classify.JudgeClient(cfg)
        replies = client.complete([("SYS", "hello"), (None, "hi there"), ("SYS", "hello")])
        assert [r.text for r in replies] == ["echo 5 <count>1</count>", "echo 8 <count>1</count>",
                                             "echo 5 <count>1</count>"]
        assert len(fj.log) == 2  # the duplicate request is sent once
        e = fj.log[0] if fj.log[0]["prompt"] == "hello" else fj.log[1]
        assert e["path"] == ("/v1/chat/completions" if api == "openai" else "/v1/messages")
        assert e["body"]["model"] == "m-test" and e["body"]["temperature"] == 0.0
        assert e["body"]["max_tokens"] == 77 and e["system"] == "SYS"
        if api == "openai":
            assert e["headers"]["authorization"] == f"Bearer {KEY}"
            assert e["body"]["messages"][0] == {"role": "system", "content": "SYS"}
        else:
            assert e["headers"]["x-api-key"] == KEY and e["headers"]["anthropic-version"]
            assert e["body"]["system"] == "SYS" and e["body"]["messages"][0]["role"] == "user"
        assert client.stats["tokens"] > 0
        # a second client on the same cache sends nothing
        again = classify.JudgeClient(cfg).complete([("SYS", "hello"), (None, "hi there")])
        assert [r.cached for r in again] == [True, True] and len(fj.log) == 2
    assert KEY not in all_output_text(tmp_path)


def test_local_server_needs_no_key(monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with FakeJudge(lambda p, s: "ok") as fj:
        client = classify.JudgeClient(classify.JudgeConfig(base_url=fj.url, api_key_env="NO_SUCH_KEY_VAR",
                                                           progress=False))
        assert client.complete([(None, "x")])[0].text == "ok"
        assert "authorization" not in fj.log[0]["headers"]
    assert "NO_SUCH_KEY_VAR is not set" in capsys.readouterr().err


def test_rpm_limit_spaces_requests():
    with FakeJudge(lambda p, s: "ok") as fj:
        client = classify.JudgeClient(classify.JudgeConfig(base_url=fj.url, rpm=1200, concurrency=4,
                                                           progress=False))
        t0 = time.monotonic()
        client.complete([(None, f"q{i}") for i in range(8)])
        wall = time.monotonic() - t0
        assert len(fj.log) == 8
    assert wall >= 7 * 0.05  # 1200 rpm = one start every 0.05 s, whatever the concurrency


# --- faults, end to end through the CLI ----------------------------------------------------------

def test_faults_every_item_labelled_or_failed_with_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", KEY)
    rows = make_rows(10)
    write_completions(tmp_path / "completions", rows)
    with FakeJudge(responder, api_key=KEY) as fj:
        fj.add_fault("status", match="<<ITEM-0>>", status=429, retry_after=1)
        fj.add_fault("status", match="<<ITEM-1>>", status=500, times=2)
        fj.add_fault("hang", match="<<ITEM-2>>", seconds=4.0)          # > the 1.5 s client timeout
        fj.add_fault("malformed", match="<<ITEM-3>>")
        fj.add_fault("malformed", match="<<ITEM-4>>", times=100)       # never recovers
        fj.add_fault("status", match="<<ITEM-6>>", status=400, times=100, message="prompt too long")
        fj.add_fault("status", match="<<ITEM-7>>", status=503, times=100, message="overloaded")
        rc = classify.main(["--input", str(tmp_path / "completions"), "--base-url", fj.url,
                            "--api-key-env", "FAKE_KEY", "--n-samples", "0"] + FAST[:-1])
        log = list(fj.log)
        first = tmp_path / "labels" / "labels.first.jsonl"
        first.write_text((tmp_path / "labels" / "labels.jsonl").read_text())
        summary1 = (tmp_path / "labels" / "summary.json").read_text()
        # a rerun sends only the failed requests again; everything that succeeded is cached
        fj.faults.clear()
        fj.log.clear()
        out = capsys.readouterr()
        assert classify.main(["--input", str(tmp_path / "completions"), "--base-url", fj.url,
                              "--api-key-env", "FAKE_KEY", "--n-samples", "0"] + FAST) == 0
        rerun = list(fj.log)
    assert sorted({item_of(e["prompt"]) for e in rerun}) == [4, 6, 7] and len(rerun) == 12
    assert all(not r.get("failed") for r in files.read_jsonl(tmp_path / "labels" / "labels.jsonl"))
    assert rc == 0
    labels = files.read_jsonl(tmp_path / "labels" / "labels.first.jsonl")
    assert len(labels) == 10
    for r in labels:
        i = item_of(r["completion"])
        for b in classify.BEHAVIORS:
            c = r["behaviors"][b]
            if i in (4, 6, 7):
                assert c is None and r["failed"][b]
            elif i == 5 and b == "subgoal":
                assert c is None and r["missing"] == ["subgoal"]
            else:
                assert c == true_count(i, b), (i, b)
    by = {item_of(r["completion"]): r for r in labels}
    failed = by[4]["failed"]["backtracking"]
    assert "malformed response" in failed and "gave up after 4" in failed
    assert by[6]["failed"]["verification"] == "HTTP 400: prompt too long"
    assert "HTTP 503: overloaded" in by[7]["failed"]["subgoal"]

    def seen(i, status=None):
        return sum(1 for e in log if f"<<ITEM-{i}>>" in e["prompt"] and (status is None or e["status"] == status))
    # what the server saw: 4 prompts per item, plus exactly the retries the faults call for
    assert seen(0) == 5 and seen(0, 429) == 1          # one 429, retried
    assert seen(1) == 6 and seen(1, 500) == 2          # two 500s, retried
    assert seen(2) == 5 and seen(2, "hang") == 1       # one timeout, retried
    assert seen(3) == 5 and seen(3, "malformed") == 1
    assert seen(4) == 16 and seen(4, 200) == 0         # 4 prompts x (1 + 3 retries), all malformed
    assert seen(6) == 4                                 # 400 is not retried
    assert seen(7) == 16                                # 503 retried, then failed
    assert sum(seen(i) for i in (5, 8, 9)) == 12        # clean items: one request per prompt
    assert len(log) == 5 + 6 + 5 + 5 + 16 + 4 + 4 + 16 + 8
    # Retry-After: 1 was honoured (the retry came at least a second after the 429)
    t429 = next(e["t"] for e in log if e["status"] == 429)
    p429 = next(e["prompt"] for e in log if e["status"] == 429)
    assert min(e["t"] for e in log if e["prompt"] == p429 and e["status"] == 200) - t429 >= 1.0
    # the summary reports missing and failed separately; averages use parsed counts only
    s = json.loads(summary1)["steps"][0]
    assert s["subgoal_missing"] == 1 and s["subgoal_failed"] == 3 and s["verification_failed"] == 3
    ok = [i for i in range(10) if i not in (4, 5, 6, 7)]
    assert s["subgoal_avg"] == pytest.approx(sum(true_count(i, "subgoal") for i in ok) / len(ok))
    assert s["accuracy"] == pytest.approx(0.5)  # even items answer (3 + 5) * 2 = 16
    assert s["mean_tokens"] == pytest.approx(sum(r["length"] for r in rows) / 10)
    assert "3 item(s) with failed requests, 1 with an answer lacking <count>" in out.err
    assert KEY not in out.out + out.err + all_output_text(tmp_path)



@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_401_stops_with_clear_error_and_no_key(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", KEY)
    write_completions(tmp_path / "completions", make_rows(20))
    with FakeJudge(responder, api_key="sk-the-right-one") as fj:
        rc = classify.main(["--input", str(tmp_path / "completions"), "--judge", api, "--base-url", fj.url,
                            "--api-key-env", "FAKE_KEY", "--concurrency", "2"] + FAST)
        n_seen = len(fj.log)
    out = capsys.readouterr()
    assert rc == 2
    assert "HTTP 401" in out.err and "Incorrect API key provided:" in out.err and "***" in out.err
    assert "$FAKE_KEY" in out.err  # names the variable to fix, never its value
    assert n_seen <= 4  # of 80 prompts: stopped at once, no retries (<= 2 per worker, a race)
    assert KEY not in out.out + out.err + all_output_text(tmp_path)


def _default_sigint():
    # a shell without job control starts background jobs with SIGINT ignored, and a child inherits
    # that: then Python installs no KeyboardInterrupt handler and the SIGINT tests could not pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "classify.py")] + args, cwd=ROOT, preexec_fn=_default_sigint,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_lines(path, n, proc, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} lines")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_and_restart_never_pays_twice(sig, tmp_path):
    """Kill the CLI while 50 of 120 requests are answered and more hang; the rerun asks the server
    only for what was never answered."""
    rows = make_rows(30)
    write_completions(tmp_path / "completions", rows)
    env = dict(os.environ, FAKE_KEY=KEY)
    args = ["--input", str(tmp_path / "completions"), "--api-key-env", "FAKE_KEY", "--n-samples", "0",
            "--concurrency", "4"] + FAST[:-1]
    cache = tmp_path / "labels" / "judge_cache.jsonl"
    with FakeJudge(responder, api_key=KEY) as fj:
        fj.hold_after(50)
        p = _run_cli(args + ["--base-url", fj.url], env=env)
        _wait_for_lines(cache, 50, p)
        time.sleep(0.2)  # let the held requests arrive
        p.send_signal(sig)
        time.sleep(0.3)  # SIGINT: let the client stop before the held requests are let go
        fj.release()
        _, err1 = p.communicate(timeout=30)
        assert p.returncode == (-9 if sig == signal.SIGKILL else 130), err1
        held = sum(1 for e in fj.log if e["status"] == "held")
        assert cache.read_text().count("\n") >= 50 and held >= 1
        assert not (tmp_path / "labels" / "labels.jsonl").exists()
        p = _run_cli(args + ["--base-url", fj.url], env=env)
        out2, err2 = p.communicate(timeout=60)
        assert p.returncode == 0, err2
        answered = fj.answered()
        received = len(fj.log)
    assert len(answered) == 120 and len(set(answered)) == 120   # every prompt paid for once
    assert received == 120 + held                                 # plus the ones cut off by the kill
    labels = files.read_jsonl(tmp_path / "labels" / "labels.jsonl")
    assert len(labels) == 30 and all(
        r["behaviors"][b] == expected(item_of(r["completion"]), b) for r in labels for b in classify.BEHAVIORS)
    assert KEY not in err1 + out2 + err2 + all_output_text(tmp_path)
    print(f"kill={sig.name}: 120 prompts, 50 answered before the kill, {held} held at the kill, "
          f"server received {received}, answered {len(answered)} (distinct {len(set(answered))})")


def test_second_process_on_the_same_output_is_refused_and_the_first_finishes(tmp_path):
    """Two real classify.py processes on one labels folder (one judge cache): the second exits 2 with
    one line naming the folder and the first's pid; the first, held mid-run, then labels every item."""
    write_completions(tmp_path / "completions", make_rows(10))
    env = dict(os.environ, FAKE_KEY=KEY)
    args = ["--input", str(tmp_path / "completions"), "--api-key-env", "FAKE_KEY", "--n-samples", "0",
            "--concurrency", "2"] + FAST[:-1]
    out = tmp_path / "labels"
    with FakeJudge(responder, api_key=KEY) as fj:
        fj.hold_after(8)
        first = _run_cli(args + ["--base-url", fj.url], env=env)
        _wait_for_lines(out / "judge_cache.jsonl", 8, first)  # mid-run: writing the cache, requests held
        second = _run_cli(args + ["--base-url", fj.url], env=env)
        out2, err2 = second.communicate(timeout=60)
        fj.release()
        out1, err1 = first.communicate(timeout=60)
    assert second.returncode == 2 and out2 == "", err2
    assert err2 == (f"error: {out} is in use by another process (pid {first.pid}): one live process owns a "
                    "classify.py output folder. Wait for it to finish or stop it, or choose another --out\n")
    assert first.returncode == 0, err1
    labels = files.read_jsonl(out / "labels.jsonl")
    assert len(labels) == 10 and all(
        r["behaviors"][b] == expected(item_of(r["completion"]), b) for r in labels for b in classify.BEHAVIORS)
    assert len(fj.answered()) == 40 == len(set(fj.answered()))  # the second paid for nothing


def test_torn_cache_line_is_skipped_and_not_glued(tmp_path):
    cache = tmp_path / "c.jsonl"
    with FakeJudge(lambda p, s: "ok " + p) as fj:
        cfg = classify.JudgeConfig(base_url=fj.url, cache=str(cache), progress=False)
        classify.JudgeClient(cfg).complete([(None, "a"), (None, "b")])
        with open(cache, "a") as f:
            f.write('{"key": "torn')  # a kill in the middle of an append
        replies = classify.JudgeClient(cfg).complete([(None, "a"), (None, "c")])
        assert [r.text for r in replies] == ["ok a", "ok c"] and len(fj.log) == 3
        client = classify.JudgeClient(cfg)
        assert [(r.cached, r.text) for r in client.complete([(None, "c")])] == [(True, "ok c")]
        # memory holds where each answer is in the file, not the answers
        assert len(client._cache) == 3 and all(isinstance(v, int) for v in client._cache.values())


# --- faults of real servers: cut answers, refusals, broken and slow bodies, 529 ------------------

def echo(prompt, system):
    return f"## Thoughts\nsome reasoning about {prompt}\n<count>1</count>"


def fault_client(fj, api, cache, **kw):
    cfg = dict(api=api, base_url=fj.url, cache=str(cache), progress=False, backoff_base=0.01,
               backoff_max=0.05, timeout=1.0, max_retries=3)
    cfg.update(kw)
    return classify.JudgeClient(classify.JudgeConfig(**cfg))


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_fault_cases_request_counts_and_nothing_cut_is_cached(api, tmp_path):
    prompts = ["LEN", "REF", "INC", "SLOW", "BUSY", "OK"]
    cache = tmp_path / "cache.jsonl"
    with FakeJudge(echo) as fj:
        fj.add_fault("length", match="LEN")                       # cut at max_tokens
        fj.add_fault("refusal", match="REF")                      # content null + refusal
        fj.add_fault("incomplete", match="INC")                   # connection dies mid-body
        fj.add_fault("trickle", match="SLOW", seconds=0.1)        # ~30 s of bytes, no slow read
        fj.add_fault("status", match="BUSY", status=529, retry_after=1)
        client = fault_client(fj, api, cache)
        replies = dict(zip(prompts, client.complete([(None, p) for p in prompts])))
        log = list(fj.log)
        counts = {p: fj.count(p) for p in prompts}
        cached_lines = cache.read_text().count("\n")
        fj.log.clear()
        again = dict(zip(prompts, fault_client(fj, api, cache).complete([(None, p) for p in prompts])))
        rerun = [e["prompt"] for e in fj.log]
    # T = 0: a cut answer and a refusal are final for this run (the same request would get the
    # same answer), recorded with their reason, and not cached as answers
    assert counts == dict(LEN=1, REF=1, INC=2, SLOW=2, BUSY=2, OK=1), counts
    assert replies["LEN"].text is None and replies["LEN"].error.startswith("truncated: ")
    assert "max_tokens=512" in replies["LEN"].error
    assert replies["REF"].text is None and replies["REF"].error.startswith("refused: ")
    for p in ("INC", "SLOW", "BUSY", "OK"):
        assert replies[p].text == echo(p, None) and replies[p].error is None, (p, replies[p])
    assert client.stats["refused"] == 1 and client.stats["truncated"] == 1
    assert cached_lines == 4
    # the slow body was cut at the 1 s deadline (not after the ~30 s it would take), then retried
    t_slow = [e["t"] for e in log if e["prompt"] == "SLOW"]
    assert 0.9 <= t_slow[1] - t_slow[0] < 2.5, t_slow
    # the 529's Retry-After: 1 was honoured (the backoff alone would wait <= 0.05 s)
    t_busy = [e["t"] for e in log if e["prompt"] == "BUSY"]
    assert t_busy[1] - t_busy[0] >= 1.0
    # a rerun asks again exactly for what was not kept
    assert sorted(rerun) == ["LEN", "REF"]
    assert again["LEN"].text == echo("LEN", None) and again["REF"].text == echo("REF", None)
    assert all(again[p].cached for p in ("INC", "SLOW", "BUSY", "OK"))


def test_refusal_and_cut_answer_are_retried_above_temperature_zero(tmp_path):
    with FakeJudge(echo) as fj:
        fj.add_fault("refusal", match="REF", times=2)
        fj.add_fault("length", match="LEN", times=10)
        client = fault_client(fj, "openai", tmp_path / "c.jsonl", temperature=0.7)
        ref, cut = client.complete([(None, "REF"), (None, "LEN")])
        assert fj.count("REF") == 3 and ref.text == echo("REF", None)
        assert fj.count("LEN") == 4 and cut.text is None        # 1 + 3 retries, all cut
        assert cut.error.startswith("truncated: ") and "gave up after 4 attempts" in cut.error


def test_refusal_reason_reaches_the_labels(tmp_path, monkeypatch):
    """Through the CLI: a refused judge request is a failed count with its reason, not a 0."""
    write_completions(tmp_path / "completions", make_rows(3))
    with FakeJudge(responder) as fj:
        fj.add_fault("refusal", match="<<ITEM-1>>")
        assert classify.main(["--input", str(tmp_path / "completions"), "--base-url", fj.url,
                              "--n-samples", "0"] + FAST) == 0
    labels = {item_of(r["completion"]): r for r in files.read_jsonl(tmp_path / "labels" / "labels.jsonl")}
    failed = labels[1]["failed"]
    assert len(failed) == 1 and next(iter(failed.values())).startswith("refused: ")
    assert None in labels[1]["behaviors"].values() and not labels[0].get("failed")


# --- sampling, aggregation, overwrite protection -------------------------------------------------

def test_seeded_sampling_per_step():
    rows = make_rows(50, steps=(0, 10))
    a = classify.sample_per_step(rows, 20, seed=1)
    b = classify.sample_per_step(rows, 20, seed=1)
    c = classify.sample_per_step(rows, 20, seed=2)
    assert sorted(a) == [0, 10] and all(len(a[s][0]) == 50 and len(a[s][1]) == 20 for s in a)
    assert a[0][1] == b[0][1] and a[0][1] != c[0][1] and a[0][1] != a[10][1]
    assert len({r["completion"] for r in a[0][1]}) == 20  # without replacement
    assert len(classify.sample_per_step(rows, 0)[0][1]) == 50


def test_rules_run_summary_and_no_silent_overwrite(tmp_path, capsys):
    rows = [dict(step=s, nums=[3, 5, 2], target=16, completion=t) for s, t in [
        (0, "3 + 5 = 8. 8 is not 16, let's try something else. 8 * 2 = 16 </think><answer>(3 + 5) * 2</answer>"),
        (0, "Let's work backwards from the target: 16 / 2 = 8. 3 + 5 = 8. </think><answer>(3 + 5) * 2</answer>"),
        (0, "3 * 5 = 15. </think><answer>3 * 5 + 2</answer>"),
        (10, "First, try to reach 8 since 8 * 2 = 16. Done. </think><answer>(5 + 3) * 2</answer>"),
    ]]
    files.write_jsonl(tmp_path / "c.jsonl", rows)
    assert classify.main(["--input", str(tmp_path / "c.jsonl"), "--judge", "rules", "--out", str(tmp_path / "o")]) == 0
    s = {r["step"]: r for r in json.loads((tmp_path / "o" / "summary.json").read_text())["steps"]}
    assert s[0]["n_judged"] == 3 and s[0]["accuracy"] == pytest.approx(2 / 3)
    assert s[0]["verification_avg"] == pytest.approx(1 / 3) and s[0]["backtracking_avg"] == pytest.approx(1 / 3)
    assert s[0]["backward_avg"] == pytest.approx(1 / 3) and s[10]["subgoal_avg"] == 1.0
    assert s[10]["accuracy"] == 1.0 and s[0]["mean_tokens"] is None
    assert s[0]["mean_chars"] == pytest.approx(sum(len(r["completion"]) for r in rows[:3]) / 3)
    csv_rows = (tmp_path / "o" / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,n_completions,n_judged,accuracy") and len(csv_rows) == 3
    # same settings: resumes and rewrites; other settings: refused with a clear message
    assert classify.main(["--input", str(tmp_path / "c.jsonl"), "--judge", "rules", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert classify.main(["--input", str(tmp_path / "c.jsonl"), "--judge", "rules", "--out", str(tmp_path / "o"),
                          "--n-samples", "5"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert classify.main(["--input", str(tmp_path / "c.jsonl"), "--judge", "rules", "--out", str(tmp_path / "o"),
                          "--n-samples", "5", "--overwrite"]) == 0


def test_bad_input_gives_clear_error(tmp_path, capsys):
    files.write_jsonl(tmp_path / "x.jsonl", [{"nums": [1, 2], "completion": "x"}])
    assert classify.main(["--input", str(tmp_path / "x.jsonl"), "--judge", "rules"]) == 2
    assert "lacks target" in capsys.readouterr().err
    assert classify.main(["--input", str(tmp_path / "missing.jsonl"), "--judge", "rules"]) == 2


def test_score_against_by_hand():
    rows = [dict(true_behaviors=t, behaviors=p) for t, p in [
        ({"verification": 2, "backtracking": 0, "subgoal": 1, "backward": 0},
         {"verification": 1, "backtracking": 1, "subgoal": 1, "backward": 0}),
        ({"verification": 0, "backtracking": 3, "subgoal": 0, "backward": 0},
         {"verification": 0, "backtracking": 1, "subgoal": None, "backward": 0}),
        ({"verification": 1, "backtracking": 0, "subgoal": 2, "backward": 0},
         {"verification": 0, "backtracking": 0, "subgoal": 0, "backward": 0}),
    ]]
    s = classify.score_against(rows)
    assert s["verification"] == dict(n=3, tp=1, fp=0, fn=1, tn=1, precision=1.0, recall=0.5, mae=pytest.approx(2 / 3))
    assert s["backtracking"]["precision"] == 0.5 and s["backtracking"]["recall"] == 1.0
    assert s["backtracking"]["mae"] == pytest.approx((1 + 2 + 0) / 3)
    assert s["subgoal"]["n"] == 2 and s["subgoal"]["recall"] == 0.5 and s["subgoal"]["mae"] == 1.0
    assert s["backward"]["precision"] is None and s["backward"]["recall"] is None and s["backward"]["mae"] == 0


def test_every_flag_has_help():
    for action in classify.build_parser()._actions:
        assert action.help, action.option_strings


# --- the rule-based judge ------------------------------------------------------------------------

def test_rules_judge_is_exact_on_synthetic_traces(tmp_path, capsys):
    """traces.generate_traces counts every behavior as it writes it, each with a marker phrase
    from traces.BEHAVIOR_PHRASES; the rules (markers plus the broader natural-wording rules)
    must recover every count exactly, so the natural rules never double count a marked instance."""
    rows = [t for c in traces.CONDITIONS for t in traces.generate_traces(c, 150, seed=3)]
    files.write_jsonl(tmp_path / "traces.jsonl", rows)
    assert classify.main(["--input", str(tmp_path / "traces.jsonl"), "--judge", "rules", "--n-samples", "0",
                          "--score-against"]) == 0
    report = json.loads((tmp_path / "traces_labels" / "score.json").read_text())
    for b, s in report["overall"].items():
        assert s["n"] == len(rows)
        assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["mae"] == 0.0, (b, s)
    # conditions that forbid a behavior: the rules find none of it
    for c, sc in report["by_condition"].items():
        for b in classify.BEHAVIORS:
            if b not in traces.ALLOWED_BEHAVIORS[c]:
                assert sc[b]["fp"] == 0 and sc[b]["tp"] == 0, (c, b)
    assert "precision" in capsys.readouterr().out


SNIPPETS = Path(__file__).resolve().parent / "behavior_snippets.jsonl"
HELDOUT = Path(__file__).resolve().parent / "behavior_snippets_heldout.jsonl"


def rules_scores(path):
    rows = classify.label_completions(files.read_jsonl(path), "rules")
    return classify.score_against(rows)


def test_snippet_fixtures_are_labelled_sets():
    for path, n_min in ((SNIPPETS, 60), (HELDOUT, 30)):
        rows = files.read_jsonl(path)
        assert len(rows) >= n_min and len({r["completion"] for r in rows}) == len(rows)
        for b in classify.BEHAVIORS:  # every behavior has positives and negatives
            assert 3 <= sum(r["behaviors"][b] > 0 for r in rows) < len(rows) - 3, (path.name, b)


def test_rules_judge_on_the_labelled_natural_set():
    """tests/behavior_snippets.jsonl: 79 snippets in varied natural wording, labelled by hand per
    the paper's judge definitions before the rules were extended (the rules were then developed
    on them, so this is a regression floor, not an unbiased estimate: see the held-out test).
    Measured at this commit: precision 1.000 for all four; recall 1.000 / 0.941 / 1.000 / 1.000."""
    s = rules_scores(SNIPPETS)
    for b in classify.BEHAVIORS:
        assert s[b]["precision"] >= 0.95 and s[b]["recall"] >= 0.9, (b, s[b])


def test_rules_judge_on_the_held_out_set():
    """tests/behavior_snippets_heldout.jsonl was written after the rules and never used to tune
    them; its numbers are the honest ones (README). The floor sits just under what was measured
    (verification 0.833/0.385, backtracking 0.714/0.625, subgoal 1.000/0.400, backward
    1.000/0.750) so a change that loses ground fails; the rules at 485e39c scored 0/0 recall on
    backtracking and backward here."""
    s = rules_scores(HELDOUT)
    floor = {"verification": (0.8, 0.38), "backtracking": (0.7, 0.6), "subgoal": (1.0, 0.4),
             "backward": (1.0, 0.75)}
    for b, (p, r) in floor.items():
        assert s[b]["precision"] >= p and s[b]["recall"] >= r, (b, s[b])


@pytest.mark.parametrize("nums,target,text,want", [
    # the issue's cases, by hand
    ([6, 2, 3], 15, "First, multiply 6 by 2 to get 12. Then add 3 to get 15.", dict()),       # a plan, no subgoal
    ([2, 3, 4, 5], 19, "I'll go back over the arithmetic: 2 * 3 = 6, 6 * 4 = 24, 24 - 5 = 19.",
     dict(verification=1)),                                                   # a re-check, no backtracking
    ([55, 19, 7], 65, "55 + 19 = 74. That's too high.", dict(verification=1)),
    ([25, 3], 22, "25 - 3 = 22. That's it!", dict(verification=1)),
    ([6, 4, 9, 2], 15, "6 + 4 = 10, 10 + 9 = 19. 9 - 6 = 3, 3 * 4 = 12. 9 * 2 = 18.", dict(backtracking=2)),
    ([6, 4, 2], 48, "The last step must be a multiplication, so I need 6 * 8. 4 * 2 = 8.", dict(backward=1)),
    ([25, 3], 22, "22 + 3 = 25, so 25 - 3 = 22.", dict(backward=1)),                        # from the target
    ([4, 9, 2], 26, "Let me first add 4 and 9 to get 13, then multiply by 2 to get 26.", dict()),
    ([10, 2, 2], 24, "I'd like to get 12 first, because 12 times 2 is 24.", dict(subgoal=1)),
    ([6, 4, 5], 15, "I need to reach 15 using each number once.", dict()),                  # the target is no subgoal
    ([8, 6, 4, 2], 20, "8 + 2 = 10, 6 - 4 = 2, 10 * 2 = 20.", dict()),                      # a parallel branch
    ([6, 4, 9], 19, "What about 6 + 4?", dict()),                                            # a first attempt
    ([6, 4, 9], 19, "6 + 4 = 10. Scratch that. 6 + 9 = 15.", dict(backtracking=1)),          # announced: once
    ([9, 3, 7], 34, "Use 9 * 3 instead of 3 * 9 for clarity: 9 * 3 = 27, 27 + 7 = 34.", dict()),
    ([25, 4, 2], 25, "25 * 4 = 100. 100 / 2 = 50.", dict()),                    # the target is a given number
])
def test_rules_judge_cases_from_the_issue(nums, target, text, want):
    assert classify.count_behaviors_rules(text, nums, target) == {b: want.get(b, 0) for b in classify.BEHAVIORS}


# --- run_all.sh paper: an LLM judge unless rules are asked for -----------------------------------

def _run_all_paper(folder, **env_extra):
    """run_all.sh paper in a fresh folder with PYTHON=echo: every CLI call is printed, not run."""
    import shutil
    (folder / "runs" / "ppo" / "qwen_base").mkdir(parents=True)
    shutil.copy(ROOT / "run_all.sh", folder / "run_all.sh")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "JUDGE", "JUDGE_ARGS")}
    env.update(PYTHON="echo", **env_extra)
    p = subprocess.run(["bash", str(folder / "run_all.sh"), "paper"], capture_output=True, text=True,
                       env=env, cwd=folder, timeout=60)
    return p, [line for line in p.stdout.splitlines() if line.startswith("classify.py")]


def test_run_all_paper_uses_an_llm_judge_unless_rules_are_explicit(tmp_path):
    p, judged = _run_all_paper(tmp_path / "a")
    assert p.returncode == 2 and "needs $OPENAI_API_KEY" in p.stderr and p.stdout == ""  # fails before training
    p, judged = _run_all_paper(tmp_path / "b", OPENAI_API_KEY="sk-x")
    assert p.returncode == 0 and judged and all("--judge openai" in line for line in judged), p.stdout
    assert "WARNING" not in p.stderr
    p, judged = _run_all_paper(tmp_path / "c", JUDGE="rules")
    assert p.returncode == 0 and judged and all("--judge rules" in line for line in judged)
    assert "WARNING: JUDGE=rules" in p.stderr and "biased" in p.stderr
    p, judged = _run_all_paper(tmp_path / "d", JUDGE_ARGS="--base-url http://localhost:8000")
    assert p.returncode == 0 and judged and all("--base-url http://localhost:8000" in line for line in judged)


# -----------------------------------------------------------------------------------------------
# The study report


def _fake_ppo_run(folder, steps_correct, n=10, length=20, text_right="12 + 3 = 15."):
    """A ppo.py-like run folder: completions/step_<N>.jsonl with `correct` of n right per step."""
    nums, target = [12, 3, 5], 20
    good = f"{text_right} Let me double-check it. 15 + 5 = 20.</think>\n<answer> 12 + 3 + 5 </answer>"
    bad = "12 * 3 = 35. Let's try something else.</think>\n<answer> 12 - 3 - 5 </answer>"
    for step, correct in steps_correct.items():
        rows = [dict(step=step, nums=nums, target=target, completion=good if i < correct else bad,
                     length=length + step) for i in range(n)]
        files.write_jsonl(Path(folder) / "completions" / f"step_{step}.jsonl", rows)


def test_wilson_interval_against_hand_values():
    # textbook values: 8/10 -> [0.490, 0.943]; 0/20 -> [0, 0.161]; 50/100 -> [0.404, 0.596]
    for (k, n), (lo, hi) in {(8, 10): (0.4902, 0.9433), (0, 20): (0.0, 0.1611),
                             (50, 100): (0.4038, 0.5962)}.items():
        got = study_report.wilson_interval(k, n)
        assert abs(got[0] - lo) < 1e-3 and abs(got[1] - hi) < 1e-3, (k, n, got)
    assert study_report.wilson_interval(0, 0) is None


def test_report_writes_results_and_figures(tmp_path, capsys):
    ppo = tmp_path / "ppo"
    _fake_ppo_run(ppo / "all_strategies_s1", {0: 3, 10: 6})
    _fake_ppo_run(ppo / "all_strategies_s2", {0: 4, 10: 8})
    _fake_ppo_run(ppo / "empty_cot_s1", {0: 2, 10: 2}, text_right="12 + 3 = 15.")
    out = tmp_path / "report"
    assert classify.main(["report", *map(str, sorted(ppo.iterdir())), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    c = res["conditions"]
    assert set(c) == {"all_strategies", "empty_cot"}
    a = c["all_strategies"]
    assert a["n_eval"] == 10 and a["n_seeds"] == 2 and set(a["seeds"]) == {"1", "2"}
    assert a["final_accuracy"] == pytest.approx(14 / 20) and a["initial_accuracy"] == pytest.approx(7 / 20)
    assert a["final_ci95"] == pytest.approx(study_report.wilson_interval(14, 20))
    s1 = a["seeds"]["1"]
    assert s1["steps"] == [0, 10] and s1["accuracy"] == [0.3, 0.6] and s1["response_length"] == [20, 30]
    # behaviors: rules counts of the fixed texts (good: one check; bad: one backtrack)
    assert s1["behaviors"]["verification"] == pytest.approx([0.3, 0.6])
    assert s1["behaviors"]["backtracking"] == pytest.approx([0.7, 0.4])
    # arithmetic: good states 2 right steps, bad states 1 wrong step (12 * 3 = 35)
    assert s1["arithmetic_accuracy"] == pytest.approx([6 / 13, 12 / 16])
    assert c["empty_cot"]["final_accuracy"] == pytest.approx(0.2)
    table = (out / "results.md").read_text()
    assert "| all_strategies | pooled | 10x2 |" in table and "0.700 [" in table
    if study_report._pyplot() is not None:
        for name in ("accuracy.png", "behaviors.png", "response_length.png", "truncated.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(res["figures"]) == 4


def test_report_without_matplotlib_and_bad_input(tmp_path, monkeypatch, capsys):
    _fake_ppo_run(tmp_path / "ppo" / "x_s0", {0: 1})
    monkeypatch.setattr(study_report, "_pyplot", lambda: None)
    assert classify.main(["report", str(tmp_path / "ppo" / "x_s0"), "--out", str(tmp_path / "r")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "results.json").read_text())["figures"] == []
    assert classify.main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert classify.main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no completions" in capsys.readouterr().err

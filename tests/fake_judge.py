"""A fake LLM judge server for tests: OpenAI chat completions and Anthropic Messages.

Standard library only. `FakeJudge()` listens on 127.0.0.1 with a port the OS picks (loopback only,
nothing leaves the machine) and answers

    POST /v1/chat/completions   (OpenAI shape: Authorization: Bearer <key>)
    POST /v1/messages           (Anthropic shape: x-api-key + anthropic-version)

with text from a `responder(prompt, system) -> str` the test supplies. Faults are injected per
prompt (a substring match) so a test can say "the request about ITEM3 gets a 429 once":

    with FakeJudge(responder, api_key="sk-test") as fj:
        fj.add_fault("status", match="ITEM3", status=429, retry_after=1)
        fj.add_fault("hang", match="ITEM4", seconds=2.0)      # longer than the client timeout
        fj.add_fault("malformed", match="ITEM5")              # 200 with a body that is not JSON
        fj.add_fault("length", match="ITEM6")                 # cut at max_tokens (finish_reason)
        fj.add_fault("refusal", match="ITEM7")                # content null + refusal / stop_reason
        fj.add_fault("incomplete", match="ITEM8")             # connection closed mid-body
        fj.add_fault("trickle", match="ITEM9", seconds=0.2)   # a byte every 0.2 s: no read times out
        fj.add_fault("status", match="ITEM1", status=529, retry_after=1)  # Anthropic overloaded
        ... point the client at fj.url ...
        fj.answered()  # prompts that got a well-formed 200, in arrival order

Every request is logged in `fj.log` (time, path, prompt, status, ...) so tests count what the
server saw. `hold_after(n)` makes every request after the n-th successful answer block until
`release()`: a test can kill a client while requests hang and know exactly what was paid for.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def client_flags(timeout, max_retries):
    """The judge client's flags for tests against a FakeJudge: short backoffs and a short
    deadline, so injected faults are retried in a fraction of a second; --no-progress comes last
    (a test that wants the progress bar drops it)."""
    return ["--backoff-base", "0.01", "--backoff-max", "0.05", "--timeout", str(timeout),
            "--max-retries", str(max_retries), "--no-progress"]


def _user_text(kind, body):
    """The last user message as plain text (string content or a list of text blocks)."""
    msgs = [m for m in body.get("messages", []) if m.get("role") == "user"]
    if not msgs:
        return ""
    content = msgs[-1].get("content", "")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return content


def _system_text(kind, body):
    if kind == "anthropic":
        system = body.get("system")
        if isinstance(system, list):
            system = "".join(b.get("text", "") for b in system if isinstance(b, dict))
        return system
    for m in body.get("messages", []):
        if m.get("role") == "system":
            return m.get("content")
    return None


class FakeJudge:
    def __init__(self, responder=None, api_key=None):
        self.responder = responder or (lambda prompt, system: "<count>0</count>")
        self.api_key = api_key          # None: accept any request without a key
        self.log = []                   # one dict per request, in arrival order
        self.faults = []
        self.lock = threading.Lock()
        self._hold_after = None
        self._released = threading.Event()
        self._n_ok = 0
        self.server = None

    # --- test-facing API -----------------------------------------------------------------------
    def add_fault(self, kind, match="", times=1, status=500, retry_after=None, seconds=0.0,
                  message="injected fault"):
        """kind: "status" (an HTTP error), "hang" (sleep, then answer), "malformed" (200, bad JSON),
        "length" (200, the answer's first half, finish_reason "length" / stop_reason
        "max_tokens"), "refusal" (200, OpenAI content null + "refusal" / Anthropic stop_reason
        "refusal"), "incomplete" (headers and half the body, then the connection closes: the
        client's IncompleteRead), "trickle" (the answer one byte every `seconds`, so each read
        is quick but the whole answer is slow). Applied to the next `times` requests whose user
        prompt contains `match`."""
        assert kind in ("status", "hang", "malformed", "length", "refusal", "incomplete", "trickle")
        self.faults.append(dict(kind=kind, match=match, times=times, status=status,
                                retry_after=retry_after, seconds=seconds, message=message))

    def hold_after(self, n):
        """After n well-formed answers, every further request blocks until release()."""
        self._hold_after = n
        self._released.clear()

    def release(self):
        self._hold_after = None
        self._released.set()

    def answered(self):
        with self.lock:
            return [e["prompt"] for e in self.log if e["status"] == 200]

    def count(self, match, status=None):
        """How many requests whose prompt contains `match` the server saw (optionally by status)."""
        with self.lock:
            return sum(1 for e in self.log if match in e["prompt"]
                       and (status is None or e["status"] == status))

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                judge._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self):
        self.release()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- request handling ----------------------------------------------------------------------
    def _send(self, h, status, payload, headers=None, raw=None):
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) or was killed: nothing to do

    def _send_in_pieces(self, h, data, pieces, seconds=0.0):
        """Promise len(data) bytes and send `pieces` of them, `seconds` apart, then close the
        connection: a server dying mid-body (a cut) or trickling its answer (a slow body)."""
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.flush()
            for piece in pieces:
                h.wfile.write(piece)
                h.wfile.flush()
                time.sleep(seconds)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        h.close_connection = True

    def _send_partial(self, h, data, n):
        """Promise len(data) bytes, send n, close the connection (a proxy or server dying)."""
        self._send_in_pieces(h, data, [data[:n]])

    def _send_slowly(self, h, data, seconds):
        """The whole answer, one byte every `seconds` (until the client hangs up)."""
        self._send_in_pieces(h, data, (data[i:i + 1] for i in range(len(data))), seconds)

    def _error(self, kind, status, message):
        if kind == "anthropic":
            return {"type": "error", "error": {"type": "api_error", "message": message}}
        return {"error": {"message": message, "type": "api_error", "code": status}}

    def _handle(self, h):
        t = time.time()
        path = h.path.rstrip("/")
        kind = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}.get(path)
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        entry = dict(t=t, path=path, kind=kind, prompt="", system=None, status=None, body=None,
                     headers={k.lower(): v for k, v in h.headers.items()})
        with self.lock:
            self.log.append(entry)
        if kind is None:
            entry["status"] = 404
            return self._send(h, 404, self._error("openai", 404, f"unknown path {path}"))
        try:
            body = json.loads(raw)
        except ValueError:
            entry["status"] = 400
            return self._send(h, 400, self._error(kind, 400, "request body is not JSON"))
        entry.update(body=body, prompt=_user_text(kind, body), system=_system_text(kind, body))

        if self.api_key is not None:
            if kind == "openai":
                given = h.headers.get("Authorization", "")
                ok = given == f"Bearer {self.api_key}"
            else:
                given = h.headers.get("x-api-key", "")
                ok = given == self.api_key and bool(h.headers.get("anthropic-version"))
            if not ok:
                entry["status"] = 401
                # Real servers echo (part of) the key they were given; echo all of it so tests
                # can check the client scrubs it from every message.
                msg = f"Incorrect API key provided: {given!s}"
                return self._send(h, 401, self._error(kind, 401, msg))

        fault = None
        with self.lock:
            for f in self.faults:
                if f["times"] > 0 and f["match"] in entry["prompt"]:
                    f["times"] -= 1
                    fault = f
                    break
        if fault is not None and fault["kind"] == "status":
            entry["status"] = fault["status"]
            headers = {}
            if fault["retry_after"] is not None:
                headers["Retry-After"] = str(fault["retry_after"])
            return self._send(h, fault["status"], self._error(kind, fault["status"],
                                                              fault["message"]), headers)
        if fault is not None and fault["kind"] == "malformed":
            entry["status"] = "malformed"
            return self._send(h, 200, None, raw=b'{"choices": [ {"message": oops')
        if fault is not None and fault["kind"] in ("length", "refusal"):
            entry["status"] = fault["kind"]
            payload = self._reply(kind, body, entry["prompt"], entry["system"], fault["kind"])
            return self._send(h, 200, payload)
        if fault is not None and fault["kind"] == "incomplete":
            entry["status"] = "incomplete"
            data = json.dumps(self._reply(kind, body, entry["prompt"], entry["system"])).encode()
            return self._send_partial(h, data, len(data) // 2)
        if fault is not None and fault["kind"] == "trickle":
            entry["status"] = "trickle"
            data = json.dumps(self._reply(kind, body, entry["prompt"], entry["system"])).encode()
            return self._send_slowly(h, data, fault["seconds"])
        if fault is not None and fault["kind"] == "hang":
            entry["status"] = "hang"
            time.sleep(fault["seconds"])
            return self._send(h, 200, self._reply(kind, body, entry["prompt"], entry["system"]))

        if self._hold_after is not None:
            with self.lock:
                held = self._n_ok >= self._hold_after
            if held:
                entry["status"] = "held"
                self._released.wait(timeout=120)
                return self._send(h, 503, self._error(kind, 503, "released"))

        payload = self._reply(kind, body, entry["prompt"], entry["system"])
        with self.lock:
            self._n_ok += 1
            entry["status"] = 200
        self._send(h, 200, payload)

    def _reply(self, kind, body, prompt, system, outcome="stop"):
        """A well-formed answer; outcome "length" cuts the text in half and says so, "refusal"
        answers the way each API refuses."""
        text = self.responder(prompt, system)
        if outcome == "length":
            text = text[:len(text) // 2]
        elif outcome == "refusal":
            text = ""
        n_in, n_out = len(prompt.split()) + len((system or "").split()), len(text.split())
        if kind == "anthropic":
            stop = {"stop": "end_turn", "length": "max_tokens", "refusal": "refusal"}[outcome]
            return {"id": "msg_fake", "type": "message", "role": "assistant",
                    "model": body.get("model"), "stop_reason": stop,
                    "content": [{"type": "text", "text": text}] if text else [],
                    "usage": {"input_tokens": n_in, "output_tokens": n_out}}
        message = {"role": "assistant", "content": text}
        if outcome == "refusal":
            message = {"role": "assistant", "content": None,
                       "refusal": "I'm sorry, I can't help with that request."}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "length" if outcome == "length" else "stop",
                             "message": message}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                          "total_tokens": n_in + n_out}}

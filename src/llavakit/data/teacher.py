"""A teacher behind any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server,
llama-cpp-python, Ollama, hosted APIs), called with the standard library only — no SDK to install.

`Teacher.chat` sends one ``POST {base_url}/chat/completions`` and retries what a long paid job meets
on the way: HTTP 429 and 5xx (honouring ``Retry-After``), timeouts, refused or reset connections (a
server restarting). The wait doubles from ``backoff`` up to ``max_backoff`` seconds, with jitter.
Other HTTP errors (400: the request itself is wrong) are not retried. Every attempt is counted in a
`Budget`, which also counts tokens from each reply's ``usage`` and says when a limit is reached.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class TeacherError(RuntimeError):
    """A request that failed for good: after every retry, or at once for a non-retryable answer."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False, attempts: int = 1):
        super().__init__(message)
        self.status, self.retryable, self.attempts = status, retryable, attempts


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class Budget:
    """Requests and tokens spent (earlier runs included), against optional limits; thread-safe."""

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None,
                 requests: int = 0, tokens: int = 0):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests, self.tokens, self.failures = requests, tokens, 0
        self._lock = threading.Lock()

    def add(self, requests: int = 0, tokens: int = 0, failures: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.tokens += tokens
            self.failures += failures

    def exhausted(self) -> str:
        """Why no new request may start ('' while the budget allows)."""
        if self.max_requests is not None and self.requests >= self.max_requests:
            return f"request budget reached ({self.requests} >= --max-requests {self.max_requests})"
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return f"token budget reached ({self.tokens} >= --max-total-tokens {self.max_tokens})"
        return ""


class Teacher:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 300.0,
                 max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0,
                 budget: Budget | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.budget = budget or Budget()

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)

    def chat(self, messages: list[dict], *, max_tokens: int = 1024, temperature: float = 0.7,
             response_format: dict | None = None, seed: int | None = None) -> Reply:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if response_format is not None:
            body["response_format"] = response_format
        if seed is not None:
            body["seed"] = seed
        last = ""
        for attempt in range(self.max_retries + 1):
            self.budget.add(requests=1)
            retry_after = None
            try:
                data = self._post(body)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                last = f"HTTP {e.code} from {self.url}: {detail}"
                if e.code not in RETRY_STATUS:
                    raise TeacherError(last, e.code, attempts=attempt + 1) from None
                retry_after = e.headers.get("Retry-After")
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as e:
                last = f"{type(e).__name__} talking to {self.url}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"the server's answer is not JSON ({e})"
            else:
                return self._reply(data, attempt + 1)
            if attempt < self.max_retries:
                time.sleep(self._wait(attempt, retry_after))
        raise TeacherError(f"gave up after {self.max_retries + 1} attempts: {last}", retryable=True,
                           attempts=self.max_retries + 1)

    def _reply(self, data: dict, attempts: int) -> Reply:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TeacherError(f"not a chat-completions answer: {json.dumps(data)[:300]}", attempts=attempts) from None
        usage = data.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.budget.add(tokens=prompt + completion)
        return Reply(text, choice.get("finish_reason"), prompt, completion, attempts)

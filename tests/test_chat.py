"""`llavakit chat` driven through a pseudo-terminal, plus the streaming/stop pieces it is made of.

The pty test runs the real command in a subprocess and types into it like a user: a question
about an image given with ``--image``, ``/image`` for a second one, ``/reset``, ``/quit``. Every
reply must be exactly what a greedy `ChatSession` in this process produces for the same
conversation, so the test fails if an image, the history or the reset is lost on the way.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from PIL import Image

from llavakit.data.conversation import Turn
from llavakit.infer.generate import ChatSession, GenerationSettings, Generator, StopTrimmer

MAX_NEW = 10
HANG_GUARD_S = 300  # only to fail instead of hanging forever; no test asserts on time


# --- pieces ----------------------------------------------------------------------------------------

def test_stop_trimmer_cuts_at_stop_and_holds_back_prefixes():
    t = StopTrimmer(["</s>", "USER:"])
    shown = [t.push(" Hello"), t.push(" wor"), t.push("ld US"), t.push("E"), t.push("R: more")]
    # "US" and "USE" could start "USER:" so they are held back; nothing after the stop is shown
    assert shown == ["Hello", " wor", "ld ", "", ""]
    assert t.flush() == ""
    t = StopTrimmer(["USER:"])
    assert t.push("a US") == "a " and t.push("A") == "USA" and t.flush() == ""
    t = StopTrimmer(["USER:"])
    assert t.push("ends with U") == "ends with " and t.flush() == "U"
    assert StopTrimmer.trim(" yes</s>junk", ["</s>"]) == "yes"


def test_generation_settings_validate():
    assert GenerationSettings(temperature=0).generate_kwargs()["do_sample"] is False
    assert GenerationSettings(temperature=0.7).generate_kwargs()["do_sample"] is True
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)


@pytest.fixture(scope="module")
def generator(tiny_built):
    model, processor = tiny_built
    return Generator(model, processor)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_images")
    paths = []
    for name, size, colour in (("red.png", (40, 30), (220, 20, 20)), ("blue.png", (24, 36), (20, 20, 220))):
        Image.new("RGB", size, colour).save(d / name)
        paths.append(d / name)
    return paths


def test_stream_gives_the_batched_reply(generator, images):
    red = Image.open(images[0]).convert("RGB")
    turns = [Turn("user", "<image>\nWhat is in the image?")]
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    pieces = list(generator.stream(turns, [red], settings))
    assert pieces, "nothing was streamed"
    assert "".join(pieces).strip() == generator.generate([turns], [[red]], settings)[0]


def test_chat_session_keeps_history_and_images(generator, images):
    red = Image.open(images[0]).convert("RGB")
    s = ChatSession(generator, GenerationSettings(max_new_tokens=4))
    s.add_image(red)
    "".join(s.ask("What <image> is it?"))  # a typed marker is dropped: images come from add_image only
    assert s.turns[0] == Turn("user", "<image>\nWhat  is it?")
    assert s.images == [red] and s.pending == [] and s.turns[1].role == "assistant"
    s.reset()
    assert s.turns == [] and s.images == []


# --- the terminal ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tiny_built, tmp_path_factory):
    model, processor = tiny_built
    d = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


class Terminal:
    """A child process on a pty: type lines, read until a pattern shows up."""

    def __init__(self, cmd: list[str]):
        env = dict(os.environ, TERM="dumb", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONIOENCODING="utf-8")
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.buffer = ""
        self.log = ""

    def read_until(self, pattern: str) -> re.Match:
        rx = re.compile(pattern, re.S)
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            m = rx.search(self.buffer)
            if m:
                self.buffer = self.buffer[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.log}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    if self.proc.poll() is not None and not rx.search(self.buffer):
                        raise AssertionError(f"process exited ({self.proc.returncode}) before {pattern!r}:\n"
                                             f"{self.log}")
                text = data.decode("utf-8", errors="replace")
                self.buffer += text
                self.log += text

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=HANG_GUARD_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def _expected_replies(generator, images):
    """What the chat must print, computed in-process with the same greedy session."""
    from llavakit.infer.chat import clean

    red, blue = (Image.open(p).convert("RGB") for p in images)
    s = ChatSession(generator, GenerationSettings(max_new_tokens=MAX_NEW))
    s.add_image(red)
    first = "".join(s.ask("What is in the image?"))
    without_image = "".join(ChatSession(generator, s.settings, turns=list(s.turns), images=list(s.images))
                            .ask("And in this one?"))
    s.add_image(blue)
    second = "".join(s.ask("And in this one?"))
    without_reset = "".join(ChatSession(generator, s.settings, turns=list(s.turns), images=list(s.images))
                            .ask("Describe it."))
    s.reset()
    after_reset = "".join(s.ask("Describe it."))
    return [clean(x) for x in (first, second, without_image, without_reset, after_reset)]


def test_chat_in_a_pty(saved_model, generator, images):
    first, second, without_image, without_reset, after_reset = _expected_replies(generator, images)
    # Otherwise the checks below could not tell a lost /image or /reset from a working one:
    assert second != without_image and after_reset != without_reset, "pick prompts whose replies differ"

    term = Terminal([sys.executable, "-m", "llavakit.cli", "chat", "--model", str(saved_model),
                     "--image", str(images[0]), "--max-new-tokens", str(MAX_NEW), "--device", "cpu"])
    try:
        term.read_until(r"\[1 image\(s\) attached to your first message\]")
        term.read_until(r"you> ")
        term.send("What is in the image?")
        reply = term.read_until(r"assistant> (.*?)\r?\nyou> ").group(1)
        assert reply == first.replace("\n", "\r\n")

        term.send(f"/image {images[1]}")
        term.read_until(r"\[image attached: .*blue\.png; 1 waiting for your next message\]")
        term.read_until(r"you> ")
        term.send("/image /no/such/file.png")
        term.read_until(r"\[cannot use /no/such/file\.png: image missing")
        term.read_until(r"you> ")
        term.send("And in this one?")
        reply = term.read_until(r"assistant> (.*?)\r?\nyou> ").group(1)
        assert reply == second.replace("\n", "\r\n")

        term.send("/reset")
        term.read_until(r"\[conversation reset\]")
        term.read_until(r"you> ")
        term.send("Describe it.")
        reply = term.read_until(r"assistant> (.*?)\r?\nyou> ").group(1)
        assert reply == after_reset.replace("\n", "\r\n")

        term.send("/quit")
    finally:
        code = term.close()
    assert code == 0, term.log


def test_library_warnings_go_to_the_log_not_the_terminal(tmp_path, capfd):
    """Whatever transformers or torch warn about while chatting lands in the log file; the terminal
    shows only the conversation."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from llavakit.infer.logs import route_library_warnings

    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
             for n in ("py.warnings", "transformers", "torch", "accelerate", "peft", "huggingface_hub")}
    try:
        path = route_library_warnings("chat", tmp_path / "chat.log")
        warnings.warn("Both `past_key_values` and `cache` are set", FutureWarning)
        hf_logging.get_logger("transformers.generation.utils").warning("a generation-config warning")
        for h in logging.getLogger("transformers").handlers:
            h.flush()
        out, err = capfd.readouterr()
        assert "past_key_values" not in out + err and "generation-config" not in out + err
        log = path.read_text()
        assert "past_key_values" in log and "a generation-config warning" in log
    finally:
        logging.captureWarnings(False)
        hf_logging.enable_default_handler()
        for n, (handlers, propagate) in saved.items():
            logging.getLogger(n).handlers[:] = handlers
            logging.getLogger(n).propagate = propagate


def test_chat_and_eval_open_run_folders_and_explain_what_they_cannot(saved_model, tmp_path, capsys):
    """`--model` takes a finetune run folder (its model/ is used) like `export` does; a LoRA-only run, a
    pretrain run or a missing folder is a clear one-line error, not a traceback."""
    import shutil

    from llavakit.cli import main
    from llavakit.infer.generate import load_generator

    run = tmp_path / "run"
    shutil.copytree(saved_model, run / "model")
    (run / "checkpoint-2").mkdir()
    gen = load_generator(str(run), device="cpu")
    assert gen.generate([[Turn("user", "hello")]], [[]], GenerationSettings(max_new_tokens=2))

    lora = tmp_path / "lora_run"
    (lora / "adapter").mkdir(parents=True)
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    data = tmp_path / "q.jsonl"
    data.write_text('{"question_id": 1, "question": "hi?", "answer": "yes"}\n')
    for argv, cmd in ((["chat", "--model", str(lora), "--device", "cpu"], "chat"),
                      (["eval", "--model", str(lora), "--data", str(data), "--out", str(tmp_path / "e")], "eval"),
                      (["chat", "--model", str(tmp_path / "nowhere"), "--device", "cpu"], "chat")):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # earlier lines: library progress bars
        assert err.startswith(f"llavakit {cmd}: --model ")
        assert ("merge-lora" in err) if "lora" in argv[2] else ("does not exist" in err)

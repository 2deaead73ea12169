"""`llavakit web`: a Gradio chat page — upload images (and videos), ask, watch the reply stream in.

    pip install 'llavakit[web]'
    llavakit web --model runs/my-model            # http://127.0.0.1:7860, this machine only

The page binds to 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0`` exposes it to the
network, without authentication). Uploads are limited in size (``--max-file-size``, enforced by the
server), in pixels, longest side and aspect ratio (``--max-pixels`` / ``--max-side`` /
``--max-aspect-ratio``, checked from the image header before decoding: a tiny 12000x1 file would
cost gigabytes once padded) and in number per conversation (``--max-images``). A model that takes videos
(``anyres_max`` with a ``<video>`` token) also accepts video files (``VIDEO_SUFFIXES``), checked from their
metadata against `VideoLimits` and at most ``--max-videos`` per conversation; another model refuses them with a
message. Requests are served one at a time (one model in memory).

Each browser tab keeps its own conversation in a `gr.State` of plain data (turn texts and image
paths); a `ChatSession` is rebuilt from it for every reply, so no model object is ever copied.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from llavakit.data.conversation import Turn
from llavakit.data.images import (DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_SIDE, ImageError, ImageLimits,
                                  add_limit_arguments, limits_from_args)

INSTALL_HINT = "llavakit web needs Gradio: pip install 'llavakit[web]'"
TITLE = "llavakit chat"
LOOPBACK = "127.0.0.1"
WEB_MAX_PIXELS = 25_000_000  # uploads: a lower pixel limit than for training data
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")  # uploads read as videos (PyAV), not images


def add_arguments(parser) -> None:
    from llavakit.infer.chat import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--host", default=LOOPBACK,
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-file-size", default="10mb", help="largest accepted upload (e.g. 10mb, 500kb)")
    add_limit_arguments(parser, max_pixels=WEB_MAX_PIXELS)  # --max-pixels / --max-side / --max-aspect-ratio
    parser.add_argument("--max-images", type=int, default=8, help="images per conversation")
    parser.add_argument("--max-videos", type=int, default=2, help="videos per conversation (models that take videos)")


def import_gradio():
    """Gradio, imported only when the page is built, with telemetry off (nothing leaves the machine)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return gr


def _new_state() -> dict:
    # turns: [[role, text], ...] finished turns; images / videos: their paths; pending*: paths for the next question
    return {"turns": [], "images": [], "pending": [], "videos": [], "pending_videos": []}


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


def upload_problem(paths: list[str], state: dict, limits: ImageLimits, max_images: int = 8, processor=None,
                   max_videos: int = 2) -> str | None:
    """Why the uploaded `paths` cannot join the conversation in `state` (shown on the page), or None.

    Each image's size is checked against `limits` (`ImageLimits`) from its header, before decoding; each video
    (`is_video`) needs a `processor` that takes videos and is checked from its metadata (`probe_video`).
    """
    from llavakit.data.video import probe_video

    videos = [p for p in paths if is_video(p)]
    images = [p for p in paths if not is_video(p)]
    if len(state["images"]) + len(state["pending"]) + len(images) > max_images:
        return f"At most {max_images} images per conversation; press Clear to start a new one."
    if videos:
        if processor is None or getattr(processor, "video_token_id", None) is None:
            return f"{os.path.basename(videos[0])}: this model takes images only (no <video> token)."
        if len(state.get("videos", [])) + len(state.get("pending_videos", [])) + len(videos) > max_videos:
            return f"At most {max_videos} videos per conversation; press Clear to start a new one."
    for p in paths:
        name = os.path.basename(p)
        try:
            if is_video(p):
                probe_video(p)  # metadata only: frame size, duration and frame count against VideoLimits
            else:
                limits.open(p).close()  # the header is checked first: nothing over a limit is decoded
        except ImageError as e:  # a VideoError is one too
            return f"{name}: {e.kind} ({e.detail.replace(p, name)}). To do: {e.hint}."
    return None


def session_from_state(generator, settings, state: dict, limits: ImageLimits, system: str | None = None):
    """A `ChatSession` holding the conversation of `state` (plain data: texts and file paths)."""
    from llavakit.infer.generate import ChatSession

    load = generator.processor.load_videos
    return ChatSession(generator, settings, system=system, turns=[Turn(r, t) for r, t in state["turns"]],
                       images=[limits.open(p) for p in state["images"]],
                       pending=[limits.open(p) for p in state["pending"]],
                       videos=[load([p])[0] for p in state.get("videos", [])],
                       pending_videos=[load([p])[0] for p in state.get("pending_videos", [])])


def build_app(generator, settings, *, system: str | None = None, max_pixels: int | None = WEB_MAX_PIXELS,
              max_side: int | None = DEFAULT_MAX_SIDE, max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
              max_images: int = 8, max_videos: int = 2):
    """The page as a `gr.Blocks` (not launched)."""
    gr = import_gradio()
    takes_videos = getattr(generator.processor, "video_token_id", None) is not None

    limits = ImageLimits(max_pixels, max_side, max_aspect_ratio)

    def on_submit(message, history, state):
        """Show the user's images and text; remember them for `on_reply`."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        state = dict(state or _new_state())
        state["question"] = None
        if not text and not files:
            return gr.MultimodalTextbox(value=None), history, state
        problem = upload_problem(files, state, limits, max_images, generator.processor, max_videos)
        if problem:  # keep the typed text, drop the files, say why
            gr.Warning(problem, duration=15)
            return gr.MultimodalTextbox(value={"text": text, "files": []}), history, state
        history = list(history or [])
        history += [{"role": "user", "content": {"path": p}} for p in files]
        state["pending"] = state["pending"] + [p for p in files if not is_video(p)]
        state["pending_videos"] = state.get("pending_videos", []) + [p for p in files if is_video(p)]
        if text:
            history.append({"role": "user", "content": text})
        state["question"] = text
        return gr.MultimodalTextbox(value=None, interactive=False), history, state

    def on_reply(history, state):
        """Stream the reply into the last chat bubble (the state follows, so a stop keeps it in step)."""
        question = state.get("question")
        if not question:  # images only: they wait for the next question
            yield history, state
            return
        session = session_from_state(generator, settings, state, limits, system)
        user = session.user_turn(question)
        base = session.turns + [user]
        turns = ([Turn("system", session.clean(system))] if system else []) + base
        images = session.images + session.pending
        videos = session.videos + session.pending_videos
        history = list(history) + [{"role": "assistant", "content": ""}]
        done_images = state["images"] + state["pending"]
        done_videos = state.get("videos", []) + state.get("pending_videos", [])
        reply = ""

        def snapshot() -> dict:
            return {"turns": [[t.role, t.content] for t in base] + [["assistant", session.clean(reply.strip())]],
                    "images": done_images, "pending": [], "videos": done_videos, "pending_videos": [],
                    "question": None}

        yield history, snapshot()
        for piece in generator.stream(turns, images, settings, videos=videos or None):
            reply += piece
            history[-1] = {"role": "assistant", "content": reply}
            yield history, snapshot()

    def on_clear():
        return [], _new_state(), gr.MultimodalTextbox(value=None, interactive=True)

    with gr.Blocks(title=TITLE) as app:
        what = "images or videos" if takes_videos else "images"
        gr.Markdown(f"## {TITLE}\nAttach one or more {what} with the paperclip, ask a question, press Enter. "
                    f"Template: `{generator.template.name}`.")
        chatbot = gr.Chatbot(elem_id="chat", height=480, label="conversation")
        box = gr.MultimodalTextbox(elem_id="ask", file_types=["image"] + (list(VIDEO_SUFFIXES) if takes_videos else []),
                                   file_count="multiple",
                                   placeholder="Ask about the images…", show_label=False, sources=["upload"])
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop", variant="secondary")
            clear = gr.Button("Clear", elem_id="clear")
        state = gr.State(_new_state())

        # Queued (so warnings reach the page) but outside the one-at-a-time limit of replies.
        sent = box.submit(on_submit, [box, chatbot, state], [box, chatbot, state], concurrency_limit=None)
        replying = sent.then(on_reply, [chatbot, state], [chatbot, state])
        replying.then(lambda: gr.MultimodalTextbox(interactive=True), None, [box])
        stop.click(lambda: gr.MultimodalTextbox(interactive=True), None, [box], cancels=[replying], queue=False)
        clear.click(on_clear, None, [chatbot, state, box], cancels=[replying], queue=False)
        chatbot.clear(on_clear, None, [chatbot, state, box], cancels=[replying], queue=False)  # its bin icon
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    try:
        gr = import_gradio()
    except ImportError as e:
        print(f"llavakit web: {e}", file=sys.stderr)
        return 2
    from llavakit.infer.chat import load_generator
    from llavakit.infer.generate import GenerationSettings

    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as e:
        print(f"llavakit web: {e}", file=sys.stderr)
        return 2
    from llavakit.infer.logs import route_library_warnings

    log_path = route_library_warnings("web", args.log)
    print(f"loading {args.model} ... (library warnings go to {log_path})", flush=True)
    try:
        generator = load_generator(args)
    except (OSError, ValueError) as e:  # no model there, a LoRA-only run, an unknown format
        print(f"llavakit web: --model {args.model}: {e}", file=sys.stderr)
        return 2
    app = build_app(generator, settings, system=args.system, **limits_from_args(args).as_kwargs(),
                    max_images=args.max_images, max_videos=getattr(args, "max_videos", 2))
    if not _is_loopback(args.host):
        print(f"warning: binding {args.host}: anyone who can reach this machine can use the page "
              "(there is no authentication)", file=sys.stderr)
    # One request at a time: a single model serves everyone.
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size,
               share=False, ssr_mode=False, show_error=True, inbrowser=False,
               theme=gr.themes.Default(), footer_links=[])
    return 0

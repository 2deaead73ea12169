"""`llavakit chat`: multi-turn terminal chat with images, replies streamed as they are generated.

    llavakit chat --model runs/my-model --image cat.jpg
    you> What is the cat doing?
    assistant> It is sleeping on a sofa.
    you> /image dog.jpg          (attach another image to the next question)
    you> /video clip.mp4         (attach a video: anyres_max models with a <video> token)
    you> /reset                  (forget the conversation and its images)
    you> /quit                   (or Ctrl-D)
"""

from __future__ import annotations

import re
import sys

HELP = """commands:
  /image PATH   attach an image to your next message (several allowed)
  /video PATH   attach a video file to your next message (models that take videos)
  /reset        start a new conversation (drops history and images)
  /help         show this help
  /quit         leave (Ctrl-D works too)"""

# C0/C1 control characters other than tab and newline: a model's output must not be able to move
# the cursor, clear the screen or change the terminal title.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="image for the first message; repeat for several")
    parser.add_argument("--video", action="append", default=[], metavar="PATH",
                        help="video file for the first message (models that take videos); repeat for several")
    from llavakit.data.images import add_limit_arguments

    add_limit_arguments(parser)  # --max-pixels / --max-side / --max-aspect-ratio, checked before decoding


def add_model_arguments(parser) -> None:
    """Which model, how to load it and how to generate (shared with `llavakit web`)."""
    parser.add_argument("--model", required=True, help="a saved llavakit model directory (or hub id)")
    parser.add_argument("--template", default=None,
                        help="conversation template (default: the one the model was trained with)")
    parser.add_argument("--system", default=None, help="system prompt replacing the template's default")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights dtype (default: as saved)")
    parser.add_argument("--log", default=None, metavar="FILE",
                        help="where library warnings go (default: $LLAVAKIT_LOG or "
                             "~/.local/state/llavakit/COMMAND.log), never into the replies")


def load_generator(args):
    """The `Generator` for ``--model/--device/--dtype/--template``."""
    from llavakit.infer.generate import load_generator as load

    return load(args.model, device=args.device, dtype=args.dtype, template=args.template)


def clean(text: str) -> str:
    return _CONTROL.sub("", text)


def open_chat_image(path: str, args):
    """The image at `path`, refused from its header when over the ``--max-*`` limits (`ImageError`)."""
    from llavakit.data.images import limits_from_args

    return limits_from_args(args).open(path)


def attach_video(session, path: str) -> str | None:
    """Read and sample the video at `path` into the session's next question; why not (shown), or None."""
    from llavakit.data.video import VideoError

    try:
        session.add_video(path)
    except VideoError as e:
        return f"{e} -> {e.hint}"
    except ValueError as e:  # the model takes no videos
        return str(e)
    return None


def run(args) -> int:
    from llavakit.data.images import ImageError
    from llavakit.infer.generate import ChatSession, GenerationSettings

    out = sys.stdout
    try:
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as e:
        print(f"llavakit chat: {e}", file=sys.stderr)
        return 2
    first_images = []
    for path in args.image:
        try:
            first_images.append((path, open_chat_image(path, args)))
        except ImageError as e:
            print(f"llavakit chat: --image {path}: {e} -> {e.hint}", file=sys.stderr)
            return 2
    from llavakit.infer.logs import route_library_warnings

    log_path = route_library_warnings("chat", args.log)
    print(f"loading {args.model} ... (library warnings go to {log_path})", file=out, flush=True)
    try:
        generator = load_generator(args)
    except (OSError, ValueError) as e:  # no model there, a LoRA-only run, an unknown format
        print(f"llavakit chat: --model {args.model}: {e}", file=sys.stderr)
        return 2
    session = ChatSession(generator, settings, system=args.system)
    for path, image in first_images:
        session.add_image(image)
    for path in getattr(args, "video", None) or []:
        problem = attach_video(session, path)
        if problem:
            print(f"llavakit chat: --video {path}: {problem}", file=sys.stderr)
            return 2
    print(f"template: {generator.template.name}. Type a message; /help lists commands.", file=out)
    if first_images:
        print(f"[{len(first_images)} image(s) attached to your first message]", file=out)
    out.flush()
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print(file=out)
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            rest = rest.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                print(HELP, file=out)
            elif cmd == "/reset":
                session.reset()
                print("[conversation reset]", file=out)
            elif cmd == "/video":
                if not rest:
                    print("usage: /video PATH", file=out)
                    continue
                problem = attach_video(session, rest)
                if problem:
                    print(f"[cannot use {rest}: {problem}]", file=out)
                else:
                    print(f"[video attached: {rest} ({len(session.pending_videos[-1])} frames); "
                          f"{len(session.pending_videos)} waiting for your next message]", file=out)
            elif cmd == "/image":
                if not rest:
                    print("usage: /image PATH", file=out)
                    continue
                try:
                    n = session.add_image(open_chat_image(rest, args))
                except ImageError as e:
                    print(f"[cannot use {rest}: {e} -> {e.hint}]", file=out)
                else:
                    print(f"[image attached: {rest}; {n} waiting for your next message]", file=out)
            else:
                print(f"unknown command {cmd}\n{HELP}", file=out)
            out.flush()
            continue
        out.write("assistant> ")
        out.flush()
        try:
            for piece in session.ask(text):
                out.write(clean(piece))
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session (the reply is not kept)
            out.write(" [interrupted]")
        out.write("\n")
        out.flush()

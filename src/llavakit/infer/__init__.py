"""Inference: prompting and generation (`generate`), the terminal chat (`chat`), the web page (`web`).

    from llavakit.infer import Generator, GenerationSettings, ChatSession
    gen = Generator(*llavakit.load("runs/my-model"))
    session = ChatSession(gen)
    session.add_image(image)
    print("".join(session.ask("What is in the image?")))
"""

from .generate import ChatSession, GenerationSettings, Generator, StopTrimmer, load_generator, resolve_template

__all__ = ["ChatSession", "GenerationSettings", "Generator", "StopTrimmer", "load_generator", "resolve_template"]

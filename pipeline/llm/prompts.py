"""Prompt templates: the bundled ones in pipeline/prompts/, or a user's text file named in the config."""
from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path
from string import Template


@lru_cache(maxsize=None)
def prompt_template(reference: str) -> Template:
    """A bundled prompt by name (`judge_pairwise`), or a file by path (anything with a `/` or a `.txt` end)."""
    if "/" in reference or reference.endswith(".txt"):
        path = Path(reference).expanduser()
        try:
            return Template(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise FileNotFoundError(f"{path}: cannot read the prompt file: {err.strerror}") from None
    bundled = importlib.resources.files("pipeline") / "prompts" / f"{reference}.txt"
    if not bundled.is_file():
        names = sorted(p.name.removesuffix(".txt") for p in (importlib.resources.files("pipeline") / "prompts")
                       .iterdir() if p.name.endswith(".txt"))
        raise FileNotFoundError(f"no bundled prompt '{reference}' (bundled: {', '.join(names)}); "
                                "give a text file's path instead")
    return Template(bundled.read_text(encoding="utf-8"))

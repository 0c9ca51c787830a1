"""Which base weights the web's run form may name.

The form's `base` field reaches the worker, which loads whatever it names: a folder on the server
or a hub id. On the web that is someone else's input, so it is restricted to model folders under
the data directory (models/ID/weights: a model trained here) and to what DIFFMINE_ALLOWED_BASES
lists (folders, with anything inside them, and hub ids, exactly). The CLI's --base is not
restricted: whoever runs the CLI already has the machine (docs/security.md, "The web boundary").
"""
from __future__ import annotations

from pathlib import Path

from app.settings import Settings


def _is_folder_entry(entry: str) -> bool:
    return entry.startswith(("/", "~", ".")) or Path(entry).expanduser().is_dir()


def web_base(settings: Settings, *, base: str | None) -> str | None:
    """The base weights as the worker will read them (a folder's resolved path, or the hub id),
    if the web may use them; raises ValueError naming what is allowed otherwise."""
    base = (base or "").strip()
    if not base:
        return None
    allowed = settings.allowed_base_list
    if base in allowed and not _is_folder_entry(base):
        return base  # a hub id the server's owner allowed
    path = Path(base).expanduser()
    # A relative path is read from the data directory (the worker's working folder may differ).
    resolved = (path if path.is_absolute() else settings.home_dir / path).resolve()
    models = settings.models_dir.resolve()
    folders = [Path(entry).expanduser().resolve() for entry in allowed if _is_folder_entry(entry)]
    inside = (resolved != models and resolved.is_relative_to(models)) or any(
        resolved.is_relative_to(folder) for folder in folders)
    if not inside:
        raise ValueError(
            f"base weights {base!r} are not allowed here: the run form takes a model folder under "
            f"the data directory ({models}/ID/weights) or one listed in DIFFMINE_ALLOWED_BASES")
    if not resolved.is_dir():
        raise ValueError(f"base weights {base!r}: no such folder")
    return str(resolved)
